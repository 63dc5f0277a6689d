//! A consumer's metrics, registered once when it starts (labelled with its group id), so
//! that counting a message costs an atomic add: no label is built per message.

use std::time::Duration;

use metrics::{Counter, Histogram, SharedString};

/// `thalo_consumer_handled_total{consumer, outcome}`.
const HANDLED: &str = "thalo_consumer_handled_total";
/// `thalo_consumer_handle_duration_seconds{consumer}`.
const HANDLE_DURATION: &str = "thalo_consumer_handle_duration_seconds";
/// `thalo_dead_letters_total{consumer}`.
const DEAD_LETTERS: &str = "thalo_dead_letters_total";
/// `thalo_consumer_lag{consumer, topic, partition}`.
const LAG: &str = "thalo_consumer_lag";

/// The handles of one running consumer's metrics.
pub(crate) struct ConsumerMetrics {
    /// The handler applied the message.
    pub(crate) applied: Counter,
    /// Dropped or skipped as already applied.
    pub(crate) duplicate: Counter,
    /// A failed handler attempt (retried, or the stream parked).
    pub(crate) failed: Counter,
    /// Written to the dead-letter topic without a stream to park (undecodable).
    pub(crate) dead_lettered: Counter,
    /// Not applied because its stream is parked: the message that parked it, and those
    /// held behind it.
    pub(crate) parked: Counter,
    /// Every message written to the dead-letter topic.
    pub(crate) dead_letters: Counter,
    /// One handler call (a projection's batch is one call).
    pub(crate) handle_duration: Histogram,
}

impl ConsumerMetrics {
    pub(crate) fn new(consumer: &str) -> Self {
        let consumer = SharedString::from(consumer.to_owned());
        let handled = |outcome: &'static str| {
            let consumer = consumer.clone();
            metrics::counter!(HANDLED, "consumer" => consumer, "outcome" => outcome)
        };
        ConsumerMetrics {
            applied: handled("applied"),
            duplicate: handled("duplicate"),
            failed: handled("failed"),
            dead_lettered: handled("dead_lettered"),
            parked: handled("parked"),
            dead_letters: metrics::counter!(DEAD_LETTERS, "consumer" => consumer.clone()),
            handle_duration: metrics::histogram!(HANDLE_DURATION, "consumer" => consumer),
        }
    }

    /// Records one handler call.
    pub(crate) fn handled_in(&self, elapsed: Duration) {
        self.handle_duration.record(elapsed.as_secs_f64());
    }
}

/// Sets `thalo_consumer_lag` of one partition: messages between the consumer's position
/// (its stored offset, else its committed one, else its fetch position) and the high
/// watermark. Called from the
/// statistics callback (once a second per consumer), never per message.
pub(crate) fn record_lag(consumer: &SharedString, topic: &str, partition: i32, lag: i64) {
    metrics::gauge!(
        LAG,
        "consumer" => consumer.clone(),
        "topic" => topic.to_owned(),
        "partition" => partition.to_string()
    )
    .set(lag.max(0) as f64);
}
