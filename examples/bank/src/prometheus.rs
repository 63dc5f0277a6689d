//! `GET /metrics`: the Prometheus exporter behind Thalo's `metrics` facade.
//!
//! Thalo's crates record through the `metrics` facade and install nothing; the
//! application chooses the exporter. `bank serve` installs
//! `metrics-exporter-prometheus` as the process's global recorder, once, and renders
//! it on `GET /metrics`. Install it before starting the service: the relay and the
//! consumer register their metrics when they start.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use thalo::Error;

/// Buckets of the `_seconds` histograms (command and handler durations): 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `thalo_group_commit_batch_size`.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// How often histogram samples are folded into their buckets between scrapes (a scrape
/// folds them too), so that memory stays bounded when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The outcome of the one installation attempt of this process.
static INSTALLED: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global `metrics` recorder, the
/// first time it is called, and returns its handle (the same handle on every call, so
/// several services in one process, as in the tests, share it).
///
/// # Errors
///
/// Returns [`Error::Config`] when another global recorder was installed first.
pub fn install() -> Result<PrometheusHandle, Error> {
    INSTALLED
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("thalo_group_commit_batch_size".to_owned()),
                        BATCH_BUCKETS,
                    )
                })
                .map_err(|e| e.to_string())?;
            let handle = builder.install_recorder().map_err(|e| e.to_string())?;
            // The relay registers its failure counter at the first failure: registered
            // here, it is exported at 0 from the start, so that a scrape shows it and a
            // `rate()` or `increase()` over it sees the first failure.
            metrics::counter!("thalo_relay_failed_total").increment(0);
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".to_owned())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                })
                .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
            Ok(handle)
        })
        .clone()
        .map_err(|e| Error::config(format!("cannot install the Prometheus recorder: {e}")))
}
