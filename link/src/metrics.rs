//! `/metrics` of both daemons, through the `prometheus-client` crate.
//!
//! The figures stay where they are counted: atomics in the stats structs of each component
//! (`ListenerStats`, `HttpStats`, the inbox, outbox and milter stats, ...), bumped on the hot
//! path with one relaxed add. Each stats source has a [`Collector`] that reads its atomics at
//! scrape time and encodes them through the crate's encoder, so nothing is counted twice and
//! no component takes a registry. A daemon registers its collectors in one [`Registry`] at
//! startup; its [`route`] encodes it at every scrape in the Prometheus text format (version 0.0.4, the format
//! `promtool check metrics` reads; no `# EOF`, and counters keep their `_total` name in
//! `# HELP`/`# TYPE`).
//!
//! The helpers below ([`counter`], [`gauge`], [`counter_family`], [`gauge_family`]) take a
//! metric's full exposed name, `_total` included, so that every name can be found with grep;
//! the crate appends `_total` to counters itself, so it is taken off before encoding.

use std::fmt;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// The `GET /metrics` route of a daemon: `registry`, encoded at every scrape.
pub fn route<S: Clone + Send + Sync + 'static>(registry: Registry) -> MethodRouter<S> {
    get(scrape).with_state(Arc::new(registry))
}

/// The answer to `GET /metrics`: the registry encoded off the async threads (collectors may
/// read files, such as the certificates for their expiry), or 500 when a collector failed.
async fn scrape(State(registry): State<Arc<Registry>>) -> Response {
    match tokio::task::spawn_blocking(move || encode(&registry)).await {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(fmt::Error)) => {
            tracing::error!("a metrics collector failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics encoding task failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            )
                .into_response()
        }
    }
}

/// The name to give the encoder for a counter exposed as `name` (which ends in `_total`).
fn counter_name(name: &str) -> &str {
    debug_assert!(
        name.ends_with("_total"),
        "counter {name} must end in _total"
    );
    name.strip_suffix("_total").unwrap_or(name)
}

/// One counter without labels, exposed as `name` (ending in `_total`).
pub fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(counter_name(name), help, None, MetricType::Counter)?)
}

/// One gauge without labels.
pub fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A counter family exposed as `name` (ending in `_total`), one sample per label set. With no
/// samples, only `# HELP` and `# TYPE` are written.
pub fn counter_family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(counter_name(name), help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family, one sample per label set.
pub fn gauge_family<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One collector alone in the text format, for tests of what it maps (empty if it failed).
pub fn encode_one(c: impl Collector) -> String {
    let mut r = Registry::default();
    r.register_collector(Box::new(c));
    encode(&r).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Two(u64);

    impl Collector for Two {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            counter(&mut enc, "mailbell_things_total", "Things.", self.0)?;
            gauge(&mut enc, "mailbell_depth", "Depth now.", self.0 + 1)?;
            counter_family(
                &mut enc,
                "mailbell_by_kind_total",
                "Things by kind.",
                [([("kind", "a\"b\\c\nd")], self.0)],
            )?;
            gauge_family(
                &mut enc,
                "mailbell_up",
                "Up (1) or not (0).",
                [([("peer", "x")], 1), ([("peer", "y")], 0)],
            )?;
            counter_family(
                &mut enc,
                "mailbell_none_total",
                "No samples yet.",
                std::iter::empty::<([(&str, &str); 1], u64)>(),
            )
        }
    }

    #[test]
    fn names_and_types_are_exposed_as_written() {
        let text = encode_one(Two(4));
        assert_eq!(
            text,
            "# HELP mailbell_things_total Things.\n\
             # TYPE mailbell_things_total counter\n\
             mailbell_things_total 4\n\
             # HELP mailbell_depth Depth now.\n\
             # TYPE mailbell_depth gauge\n\
             mailbell_depth 5\n\
             # HELP mailbell_by_kind_total Things by kind.\n\
             # TYPE mailbell_by_kind_total counter\n\
             mailbell_by_kind_total{kind=\"a\\\"b\\\\c\\nd\"} 4\n\
             # HELP mailbell_up Up (1) or not (0).\n\
             # TYPE mailbell_up gauge\n\
             mailbell_up{peer=\"x\"} 1\n\
             mailbell_up{peer=\"y\"} 0\n\
             # HELP mailbell_none_total No samples yet.\n\
             # TYPE mailbell_none_total counter\n"
        );
    }

    #[tokio::test]
    async fn scrape_answers_with_the_text_format() {
        let mut r = Registry::default();
        r.register_collector(Box::new(Two(1)));
        let resp = scrape(State(Arc::new(r))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }

    #[derive(Debug)]
    struct Broken;

    impl Collector for Broken {
        fn encode(&self, _: DescriptorEncoder) -> fmt::Result {
            Err(fmt::Error)
        }
    }

    #[tokio::test]
    async fn a_failing_collector_is_a_500() {
        let mut r = Registry::default();
        r.register_collector(Box::new(Broken));
        let resp = scrape(State(Arc::new(r))).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
