//! The Kafka message format: one event per message, described by its headers.
//!
//! The relay writes, and consumers read, messages of this shape:
//!
//! | part    | content                                                        |
//! |---------|----------------------------------------------------------------|
//! | topic   | one per aggregate type (see [`TopicNaming`](crate::TopicNaming)) |
//! | key     | the aggregate id, so one aggregate's events share a partition  |
//! | value   | the event's JSON payload, exactly as stored                    |
//! | headers | see [`header`]                                                 |
//!
//! The headers follow the [CloudEvents Kafka protocol binding] in binary content mode
//! (`ce_id`, `ce_type`, `ce_source`, `ce_specversion`, `ce_time`, `ce_subject`,
//! `content-type`), so any CloudEvents SDK, in any language, reads a Thalo message as a
//! CloudEvent. Everything else Thalo knows about the event travels in `thalo_*` headers,
//! except its [W3C Trace Context], which travels in the headers `traceparent` and
//! `tracestate` as OpenTelemetry's Kafka instrumentations propagate it, so they continue
//! the trace too. All header values are UTF-8 strings.
//!
//! [CloudEvents Kafka protocol binding]: https://github.com/cloudevents/spec/blob/main/cloudevents/bindings/kafka-protocol-binding.md
//! [W3C Trace Context]: https://www.w3.org/TR/trace-context/

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::Message;
use thalo::{Error, Event, EventEnvelope, Metadata, RawEvent};
use uuid::Uuid;

/// Header names.
///
/// Required on every message the relay writes, and by [`decode_message`]:
/// `ce_id`, `ce_type`, `ce_time`, `thalo_aggregate_type`, `thalo_aggregate_id`,
/// `thalo_sequence`, `thalo_position`, `thalo_event_version`. The others are optional.
pub mod header {
    /// CloudEvents `id`: the event id (UUID).
    pub const CE_ID: &str = "ce_id";
    /// CloudEvents `type`: the event's stable type name, e.g. `AccountOpened`.
    pub const CE_TYPE: &str = "ce_type";
    /// CloudEvents `source`: `thalo/<aggregate type>`.
    pub const CE_SOURCE: &str = "ce_source";
    /// CloudEvents `specversion`: always `1.0`.
    pub const CE_SPECVERSION: &str = "ce_specversion";
    /// CloudEvents `time`: when the event was stored, RFC 3339 in UTC.
    pub const CE_TIME: &str = "ce_time";
    /// CloudEvents `subject`: the aggregate id.
    pub const CE_SUBJECT: &str = "ce_subject";
    /// The content type of the value: always `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The aggregate's stable type name, e.g. `bank_account`.
    pub const AGGREGATE_TYPE: &str = "thalo_aggregate_type";
    /// The aggregate id (also the message key).
    pub const AGGREGATE_ID: &str = "thalo_aggregate_id";
    /// The event's sequence in its aggregate's stream, from 1, contiguous.
    pub const SEQUENCE: &str = "thalo_sequence";
    /// The event's global position in the event store.
    pub const POSITION: &str = "thalo_position";
    /// The relay leader's epoch (fencing token) that published the message: consumers
    /// drop a message from an older epoch for an aggregate they saw a newer epoch of.
    pub const EPOCH: &str = "thalo_epoch";
    /// The schema version of the payload.
    pub const EVENT_VERSION: &str = "thalo_event_version";
    /// The correlation id (UUID), when the event has one.
    pub const CORRELATION_ID: &str = "thalo_correlation_id";
    /// The causation id (UUID), when the event has one.
    pub const CAUSATION_ID: &str = "thalo_causation_id";
    /// Prefix of the event's free-form metadata headers: metadata header `user` travels
    /// as `thalo_meta_user`.
    pub const META_PREFIX: &str = "thalo_meta_";
    /// The W3C Trace Context `traceparent` of the request that caused the event
    /// ([`Metadata::traceparent`](thalo::Metadata::traceparent)), under its standard
    /// name, so any instrumented Kafka client continues the trace (it also travels as
    /// `thalo_meta_traceparent`, with the other metadata headers).
    pub const TRACEPARENT: &str = "traceparent";
    /// The W3C Trace Context `tracestate` that goes with [`TRACEPARENT`].
    pub const TRACESTATE: &str = "tracestate";

    /// Dead-letter messages: the error that sent the message there (its whole chain of
    /// causes, `: `-separated).
    pub const DLQ_ERROR: &str = "thalo_dlq_error";
    /// Dead-letter messages: `decode` (the message could not be decoded), `handler`
    /// (the handler kept failing), `gap` (an earlier event of the aggregate never
    /// arrived) or `held` (an earlier event of the aggregate is parked; this one waits
    /// behind it).
    pub const DLQ_REASON: &str = "thalo_dlq_reason";
    /// Dead-letter messages: how many times the handler was tried (0 for `decode`).
    pub const DLQ_ATTEMPTS: &str = "thalo_dlq_attempts";
    /// Dead-letter messages: the topic the message was read from.
    pub const DLQ_TOPIC: &str = "thalo_dlq_topic";
    /// Dead-letter messages: the partition the message was read from.
    pub const DLQ_PARTITION: &str = "thalo_dlq_partition";
    /// Dead-letter messages: the offset of the message in that partition.
    pub const DLQ_OFFSET: &str = "thalo_dlq_offset";
    /// Dead-letter messages: the consumer group that gave up on it.
    pub const DLQ_GROUP: &str = "thalo_dlq_group";
    /// Dead-letter messages: when it was dead-lettered, RFC 3339.
    pub const DLQ_TIME: &str = "thalo_dlq_time";
}

/// The value of `ce_specversion`.
pub const SPEC_VERSION: &str = "1.0";
/// The value of `content-type`.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// The headers of the message that carries `envelope` (see the [module docs](self)).
pub fn encode_headers(envelope: &EventEnvelope<RawEvent>) -> OwnedHeaders {
    let source = format!("thalo/{}", envelope.aggregate_type);
    let time = envelope
        .timestamp
        .to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let id = envelope.id.to_string();
    let sequence = envelope.sequence.to_string();
    let position = envelope.position.to_string();
    let version = envelope.event.version.to_string();

    let mut headers = OwnedHeaders::new_with_capacity(16 + envelope.metadata.headers.len())
        .insert(str_header(header::CE_SPECVERSION, SPEC_VERSION))
        .insert(str_header(header::CE_ID, &id))
        .insert(str_header(header::CE_TYPE, &envelope.event.event_type))
        .insert(str_header(header::CE_SOURCE, &source))
        .insert(str_header(header::CE_TIME, &time))
        .insert(str_header(header::CE_SUBJECT, &envelope.aggregate_id))
        .insert(str_header(header::CONTENT_TYPE, CONTENT_TYPE_JSON))
        .insert(str_header(header::AGGREGATE_TYPE, &envelope.aggregate_type))
        .insert(str_header(header::AGGREGATE_ID, &envelope.aggregate_id))
        .insert(str_header(header::SEQUENCE, &sequence))
        .insert(str_header(header::POSITION, &position))
        .insert(str_header(header::EVENT_VERSION, &version));
    if let Some(id) = envelope.metadata.correlation_id {
        headers = headers.insert(str_header(header::CORRELATION_ID, &id.to_string()));
    }
    if let Some(id) = envelope.metadata.causation_id {
        headers = headers.insert(str_header(header::CAUSATION_ID, &id.to_string()));
    }
    for (key, value) in &envelope.metadata.headers {
        let key = format!("{}{key}", header::META_PREFIX);
        headers = headers.insert(str_header(&key, value));
    }
    if let Some(traceparent) = envelope.metadata.traceparent() {
        headers = headers.insert(str_header(header::TRACEPARENT, traceparent));
        if let Some(tracestate) = envelope.metadata.tracestate() {
            headers = headers.insert(str_header(header::TRACESTATE, tracestate));
        }
    }
    headers
}

fn str_header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// Reads the event envelope out of a message written by the relay, keeping the event
/// encoded. [`decode_message`] also decodes the event.
///
/// # Errors
///
/// Returns [`Error::Serialization`] when a required header is missing or malformed, or
/// the value is missing or not UTF-8.
pub fn decode_raw_message<M: Message>(message: &M) -> Result<EventEnvelope<RawEvent>, Error> {
    let mut required = Required::default();
    let mut metadata = Metadata::default();
    // The standard headers win over the `thalo_meta_` copies, whatever their order.
    let (mut traceparent, mut tracestate) = (None, None);
    if let Some(headers) = message.headers() {
        for h in headers.iter() {
            let Some(value) = h.value else { continue };
            let value = std::str::from_utf8(value).map_err(|e| malformed(h.key, e))?;
            match h.key {
                header::CE_ID => required.id = Some(parse_uuid(h.key, value)?),
                header::CE_TYPE => required.event_type = Some(value.to_owned()),
                header::CE_TIME => {
                    required.time = Some(
                        DateTime::parse_from_rfc3339(value)
                            .map_err(|e| malformed(h.key, e))?
                            .with_timezone(&Utc),
                    );
                }
                header::AGGREGATE_TYPE => required.aggregate_type = Some(value.to_owned()),
                header::AGGREGATE_ID => required.aggregate_id = Some(value.to_owned()),
                header::SEQUENCE => {
                    required.sequence = Some(value.parse().map_err(|e| malformed(h.key, e))?);
                }
                header::POSITION => {
                    required.position = Some(value.parse().map_err(|e| malformed(h.key, e))?);
                }
                header::EVENT_VERSION => {
                    required.version = Some(value.parse().map_err(|e| malformed(h.key, e))?);
                }
                header::CORRELATION_ID => metadata.correlation_id = Some(parse_uuid(h.key, value)?),
                header::CAUSATION_ID => metadata.causation_id = Some(parse_uuid(h.key, value)?),
                header::TRACEPARENT => traceparent = Some(value),
                header::TRACESTATE => tracestate = Some(value),
                key => {
                    if let Some(name) = key.strip_prefix(header::META_PREFIX) {
                        metadata.headers.insert(name.to_owned(), value.to_owned());
                    }
                }
            }
        }
    }
    // Invalid values are dropped, not an error: a trace context is no reason to refuse
    // an event.
    if let Some(value) = traceparent.filter(|v| Metadata::is_valid_traceparent(v)) {
        metadata = metadata.with_traceparent(value);
        metadata.headers.remove(Metadata::TRACESTATE);
        if let Some(value) = tracestate {
            metadata = metadata.with_tracestate(value);
        }
    }
    let payload = message
        .payload()
        .ok_or_else(|| Error::serialization("Kafka message value", FormatError::MissingValue))?;
    let payload = std::str::from_utf8(payload)
        .map_err(|e| Error::serialization("Kafka message value", e))?
        .to_owned();
    Ok(EventEnvelope {
        id: required.id.ok_or_else(|| missing(header::CE_ID))?,
        aggregate_type: required
            .aggregate_type
            .ok_or_else(|| missing(header::AGGREGATE_TYPE))?,
        aggregate_id: required
            .aggregate_id
            .ok_or_else(|| missing(header::AGGREGATE_ID))?,
        sequence: required.sequence.ok_or_else(|| missing(header::SEQUENCE))?,
        position: required.position.ok_or_else(|| missing(header::POSITION))?,
        timestamp: required.time.ok_or_else(|| missing(header::CE_TIME))?,
        metadata,
        event: RawEvent {
            event_type: required
                .event_type
                .ok_or_else(|| missing(header::CE_TYPE))?,
            version: required
                .version
                .ok_or_else(|| missing(header::EVENT_VERSION))?,
            payload,
        },
    })
}

/// Decodes a message written by the relay into the envelope of an `E`, with
/// [`Event::decode_from`] and the message's aggregate type (so old schema versions are
/// upcast, and an [`EventSet`](thalo::EventSet) picks the right aggregate).
///
/// # Errors
///
/// Returns [`Error::Serialization`] when a required header is missing or malformed or
/// the payload does not match the event, [`Error::UnknownEventType`] when `E` does
/// not know the event type, and [`Error::UnknownAggregateType`] when `E` is an event set
/// without the message's aggregate type.
pub fn decode_message<E: Event, M: Message>(message: &M) -> Result<EventEnvelope<E>, Error> {
    decode_raw_message(message)?.decode()
}

#[derive(Default)]
struct Required {
    id: Option<Uuid>,
    event_type: Option<String>,
    time: Option<DateTime<Utc>>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    sequence: Option<u64>,
    position: Option<u64>,
    version: Option<u16>,
}

fn parse_uuid(key: &str, value: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(value).map_err(|e| malformed(key, e))
}

fn missing(key: &'static str) -> Error {
    Error::serialization(
        format!("Kafka message header `{key}`"),
        FormatError::MissingHeader(key),
    )
}

fn malformed(key: &str, source: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::serialization(format!("Kafka message header `{key}`"), source)
}

/// What is wrong with a message that is not in Thalo's format.
#[derive(Debug)]
enum FormatError {
    MissingHeader(&'static str),
    MissingValue,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::MissingHeader(key) => write!(f, "header `{key}` is missing"),
            FormatError::MissingValue => f.write_str("the message has no value"),
        }
    }
}

impl std::error::Error for FormatError {}

/// The error and its causes on one line, `: `-separated (for logs and messages: a
/// `thalo::Error` prints only its context, its cause is the source).
///
/// ```
/// let err = thalo::Error::broker("connecting", std::io::Error::other("connection refused"));
/// assert_eq!(
///     thalo_kafka::error_chain(&err),
///     "message broker error: connecting: connection refused"
/// );
/// ```
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Headers as `(key, value)` pairs, for copying them onto a dead-letter message.
pub(crate) fn header_pairs<M: Message>(message: &M) -> Vec<(String, Option<Vec<u8>>)> {
    message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;

    fn envelope() -> EventEnvelope<RawEvent> {
        EventEnvelope {
            id: Uuid::new_v4(),
            aggregate_type: "bank_account".into(),
            aggregate_id: "acc-1".into(),
            sequence: 3,
            position: 42,
            timestamp: DateTime::parse_from_rfc3339("2024-05-01T12:00:00.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            metadata: Metadata::new()
                .with_correlation_id(Uuid::new_v4())
                .with_causation_id(Uuid::new_v4())
                .with_header("user", "alice"),
            event: RawEvent {
                event_type: "AccountOpened".into(),
                version: 2,
                payload: r#"{"initial_cents":1000}"#.into(),
            },
        }
    }

    fn message(headers: Option<OwnedHeaders>, payload: Option<&str>) -> OwnedMessage {
        OwnedMessage::new(
            payload.map(|p| p.as_bytes().to_vec()),
            Some(b"acc-1".to_vec()),
            "bank_account".into(),
            Timestamp::NotAvailable,
            0,
            0,
            headers,
        )
    }

    #[test]
    fn headers_round_trip() {
        let envelope = envelope();
        let msg = message(
            Some(encode_headers(&envelope)),
            Some(&envelope.event.payload),
        );
        assert_eq!(decode_raw_message(&msg).unwrap(), envelope);
    }

    #[test]
    fn cloudevents_headers_are_present() {
        let envelope = envelope();
        let headers = encode_headers(&envelope);
        let get = |key: &str| {
            headers
                .iter()
                .find(|h| h.key == key)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
        };
        assert_eq!(get("ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(get("ce_id"), Some(envelope.id.to_string()));
        assert_eq!(get("ce_type").as_deref(), Some("AccountOpened"));
        assert_eq!(get("ce_source").as_deref(), Some("thalo/bank_account"));
        assert_eq!(
            get("ce_time").as_deref(),
            Some("2024-05-01T12:00:00.123456Z")
        );
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        assert_eq!(get("thalo_meta_user").as_deref(), Some("alice"));
    }

    #[test]
    fn missing_header_is_a_serialization_error() {
        let msg = message(
            Some(OwnedHeaders::new().insert(str_header(header::CE_TYPE, "AccountOpened"))),
            Some("{}"),
        );
        let err = decode_raw_message(&msg).unwrap_err();
        assert!(matches!(err, Error::Serialization { .. }), "{err:?}");
        assert_eq!(
            error_chain(&err),
            "could not (de)serialize Kafka message header `ce_id`: header `ce_id` is missing"
        );
    }

    #[test]
    fn missing_value_is_an_error() {
        let envelope = envelope();
        let msg = message(Some(encode_headers(&envelope)), None);
        assert!(decode_raw_message(&msg).is_err());
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn values(headers: &OwnedHeaders, key: &str) -> Vec<String> {
        headers
            .iter()
            .filter(|h| h.key == key)
            .filter_map(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    #[test]
    fn trace_context_travels_in_the_standard_headers() {
        let mut envelope = envelope();
        envelope.metadata = envelope
            .metadata
            .with_traceparent(PARENT)
            .with_tracestate("rojo=00f067aa0ba902b7");
        let headers = encode_headers(&envelope);
        assert_eq!(values(&headers, "traceparent"), [PARENT]);
        assert_eq!(values(&headers, "tracestate"), ["rojo=00f067aa0ba902b7"]);

        let decoded =
            decode_raw_message(&message(Some(headers), Some(&envelope.event.payload))).unwrap();
        assert_eq!(decoded.metadata.traceparent(), Some(PARENT));
        assert_eq!(decoded.metadata.tracestate(), Some("rojo=00f067aa0ba902b7"));
        assert_eq!(decoded, envelope);

        // No trace context, no trace headers.
        let headers = encode_headers(&self::envelope());
        assert!(values(&headers, "traceparent").is_empty());
        assert!(values(&headers, "tracestate").is_empty());
    }

    #[test]
    fn the_standard_trace_headers_win_and_invalid_ones_are_dropped() {
        let envelope = envelope();
        let payload = Some(envelope.event.payload.as_str());
        // An intermediary that continued the trace rewrote `traceparent`; the
        // `thalo_meta_` copies (here after it) are older.
        let newer = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01";
        let headers = encode_headers(&envelope)
            .insert(str_header(header::TRACEPARENT, newer))
            .insert(str_header("thalo_meta_traceparent", PARENT))
            .insert(str_header("thalo_meta_tracestate", "rojo=1"));
        let decoded = decode_raw_message(&message(Some(headers), payload)).unwrap();
        assert_eq!(decoded.metadata.traceparent(), Some(newer));
        assert_eq!(decoded.metadata.tracestate(), None);

        // A malformed trace context is not a reason to refuse the event.
        let headers = encode_headers(&envelope)
            .insert(str_header(header::TRACEPARENT, "00-xyz-01"))
            .insert(str_header(header::TRACESTATE, "rojo=1"));
        let decoded = decode_raw_message(&message(Some(headers), payload)).unwrap();
        assert_eq!(decoded.metadata.traceparent(), None);
        assert_eq!(decoded.metadata, envelope.metadata);
    }
}
