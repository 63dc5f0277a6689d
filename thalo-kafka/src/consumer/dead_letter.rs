//! The dead-letter topic: the record of every message a consumer did not apply.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::Message;
use thalo::Event;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::worker::Outcome;
use super::{Apply, Shared};
use crate::backoff::sleep_or_cancel;
use crate::message::{header, header_pairs};

/// Why a message goes to the dead-letter topic (the [`header::DLQ_REASON`] header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeadLetterReason {
    /// The message could not be decoded.
    Decode,
    /// The handler kept failing.
    Handler,
    /// An earlier event of the aggregate is missing: the stream is parked.
    Gap,
    /// The stream is parked: the message waits behind the event that parked it (a copy
    /// for the record; re-drive it from the store).
    Held,
}

impl DeadLetterReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Handler => "handler",
            DeadLetterReason::Gap => "gap",
            DeadLetterReason::Held => "held",
        }
    }
}

impl<E: Event, A: Apply<E>> Shared<E, A> {
    /// Writes `message` to the dead-letter topic with the reason in its headers, retrying
    /// until the broker accepts it: the offset must not move past a message that is
    /// neither handled nor dead-lettered.
    pub(crate) async fn dead_letter(
        &self,
        message: &OwnedMessage,
        error_text: &str,
        reason: DeadLetterReason,
        attempts: u32,
        token: &CancellationToken,
    ) -> Outcome {
        let topic = self.config.dead_letter_topic(message.topic());
        let original = header_pairs(message);
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let attempts_text = attempts.to_string();
        let mut failures = 0;
        loop {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let mut headers = OwnedHeaders::new_with_capacity(original.len() + 8);
            for (key, value) in &original {
                headers = headers.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
            for (key, value) in [
                (header::DLQ_ERROR, error_text),
                (header::DLQ_REASON, reason.as_str()),
                (header::DLQ_ATTEMPTS, &attempts_text),
                (header::DLQ_TOPIC, message.topic()),
                (header::DLQ_PARTITION, &partition),
                (header::DLQ_OFFSET, &offset),
                (header::DLQ_GROUP, &self.config.group_id),
                (header::DLQ_TIME, &now),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&topic).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match self
                .dlq_producer
                .send(record, Timeout::After(Duration::from_secs(5)))
                .await
            {
                Ok(delivery) => {
                    self.metrics.dead_letters.increment(1);
                    if reason != DeadLetterReason::Held {
                        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    }
                    warn!(
                        group = self.config.group_id,
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        dead_letter_topic = topic,
                        dead_letter_partition = delivery.partition,
                        dead_letter_offset = delivery.offset,
                        reason = reason.as_str(),
                        "message written to the dead-letter topic; moving on"
                    );
                    return Outcome::Done;
                }
                Err((send_err, _)) => {
                    failures += 1;
                    let delay = self.config.retry.backoff(failures);
                    warn!(dead_letter_topic = topic, error = %send_err, retry_in_ms = delay.as_millis() as u64, "cannot write to the dead-letter topic; retrying");
                    if !sleep_or_cancel(delay, token).await {
                        return Outcome::Interrupted;
                    }
                }
            }
        }
    }
}
