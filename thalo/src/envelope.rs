//! Envelopes: an event together with where, when and why it was stored.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{CommandId, Error, Event};

/// Context stored with every event: why it happened and who asked.
///
/// `correlation_id` ties together everything caused by one request; `causation_id` names
/// the message (command or event) that directly caused this one. `command_id` is the
/// idempotency key of the command that stored the event, set by
/// [`Repository::execute_once`](crate::Repository::execute_once). `headers` are
/// free-form strings (user id, tenant, ...); the W3C trace context has its own
/// accessors ([`with_traceparent`](Metadata::with_traceparent)).
///
/// ```
/// use thalo::Metadata;
/// use uuid::Uuid;
///
/// let request = Uuid::new_v4();
/// let metadata = Metadata::new()
///     .with_correlation_id(request)
///     .with_header("user", "alice");
/// assert_eq!(metadata.correlation_id, Some(request));
/// assert_eq!(metadata.headers["user"], "alice");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Identifies the whole flow this event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// Identifies the message that caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// The idempotency key of the command that stored this event, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<CommandId>,
    /// Free-form string headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    #[must_use]
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the command id (done by
    /// [`Repository::execute_once`](crate::Repository::execute_once)).
    #[must_use]
    pub fn with_command_id(mut self, id: CommandId) -> Self {
        self.command_id = Some(id);
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// The [`headers`](Metadata::headers) key of the W3C Trace Context `traceparent`.
    pub const TRACEPARENT: &'static str = "traceparent";
    /// The [`headers`](Metadata::headers) key of the W3C Trace Context `tracestate`.
    pub const TRACESTATE: &'static str = "tracestate";

    /// Sets the [W3C Trace Context](https://www.w3.org/TR/trace-context/) `traceparent`
    /// of the request that caused the event (header [`TRACEPARENT`](Self::TRACEPARENT)),
    /// so that whoever handles the event continues its trace: `thalo-kafka` sends it as
    /// the Kafka header `traceparent` and its consumers start their spans from it.
    ///
    /// Only a valid value is stored (see
    /// [`is_valid_traceparent`](Metadata::is_valid_traceparent)); an invalid one is
    /// ignored and the metadata is returned unchanged, as the recommendation asks of a
    /// receiver that cannot parse the header. With `thalo`'s `opentelemetry` feature,
    /// [`Repository::execute`](crate::Repository::execute) sets it from the current span
    /// when the caller did not.
    ///
    /// ```
    /// use thalo::Metadata;
    ///
    /// let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    /// let metadata = Metadata::new().with_traceparent(parent);
    /// assert_eq!(metadata.traceparent(), Some(parent));
    /// assert_eq!(Metadata::new().with_traceparent("not-a-traceparent").traceparent(), None);
    /// ```
    #[must_use]
    pub fn with_traceparent(mut self, value: impl Into<String>) -> Self {
        let value = value.into();
        if Self::is_valid_traceparent(&value) {
            self.headers.insert(Self::TRACEPARENT.to_owned(), value);
        }
        self
    }

    /// The W3C `traceparent`, when the headers hold a valid one.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers
            .get(Self::TRACEPARENT)
            .map(String::as_str)
            .filter(|value| Self::is_valid_traceparent(value))
    }

    /// Sets the W3C Trace Context `tracestate` (vendor-specific trace data that goes
    /// with the [`traceparent`](Metadata::with_traceparent); header
    /// [`TRACESTATE`](Self::TRACESTATE)). Only a value of at most 512 printable ASCII
    /// characters in at most 32 list members is stored; another is ignored.
    #[must_use]
    pub fn with_tracestate(mut self, value: impl Into<String>) -> Self {
        let value = value.into();
        if crate::trace::is_valid_tracestate(&value) {
            self.headers.insert(Self::TRACESTATE.to_owned(), value);
        }
        self
    }

    /// The W3C `tracestate`, when the headers hold a valid one.
    pub fn tracestate(&self) -> Option<&str> {
        self.headers
            .get(Self::TRACESTATE)
            .map(String::as_str)
            .filter(|value| crate::trace::is_valid_tracestate(value))
    }

    /// Whether `value` is a W3C `traceparent` Thalo accepts: version `00`, that is
    /// `00-<trace id>-<parent id>-<flags>` with 32, 16 and 2 lowercase hex digits, and
    /// neither id all zeros.
    pub fn is_valid_traceparent(value: &str) -> bool {
        crate::trace::is_valid_traceparent(value)
    }

    /// Metadata for messages caused by `envelope`: same correlation id (or the envelope's
    /// event id when it had none), causation id = the envelope's event id.
    pub fn caused_by<E>(envelope: &EventEnvelope<E>) -> Self {
        Self {
            correlation_id: Some(envelope.metadata.correlation_id.unwrap_or(envelope.id)),
            causation_id: Some(envelope.id),
            command_id: None,
            headers: BTreeMap::new(),
        }
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none()
            && self.causation_id.is_none()
            && self.command_id.is_none()
            && self.headers.is_empty()
    }
}

/// A stored event with its position in its stream and in the global log.
///
/// Sequences start at 1 for the first event of an aggregate and are contiguous; the
/// aggregate's *version* is the sequence of its last event, so a new aggregate has
/// version 0. Global positions start at 1, increase with every stored event and may have
/// gaps (a rolled-back transaction consumes positions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope<E> {
    /// Unique id of this event.
    pub id: Uuid,
    /// Stable type name of the aggregate ([`AggregateType::TYPE`](crate::AggregateType::TYPE)).
    pub aggregate_type: String,
    /// The aggregate's identity, in its `Display` form.
    pub aggregate_id: String,
    /// Position in the aggregate's stream, from 1, contiguous.
    pub sequence: u64,
    /// Position in the store's global order, from 1.
    pub position: u64,
    /// When the event was stored.
    pub timestamp: DateTime<Utc>,
    /// Correlation, causation and headers.
    pub metadata: Metadata,
    /// The event.
    pub event: E,
}

impl<E> EventEnvelope<E> {
    /// The same envelope around another event (e.g. after decoding).
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> EventEnvelope<F> {
        EventEnvelope {
            id: self.id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            position: self.position,
            timestamp: self.timestamp,
            metadata: self.metadata,
            event: f(self.event),
        }
    }
}

/// An event as stores keep it: type name, schema version and JSON payload.
///
/// Returned by [`EventStore::read_all`](crate::EventStore::read_all), which crosses
/// aggregate types; decode it with [`EventEnvelope::decode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawEvent {
    /// Stable type name ([`Event::event_type`]).
    pub event_type: String,
    /// Schema version ([`Event::event_version`]).
    pub version: u16,
    /// JSON payload ([`Event::encode`]).
    pub payload: String,
}

impl RawEvent {
    /// Encodes `event`.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Serialization`] when the event cannot be serialized.
    pub fn encode<E: Event>(event: &E) -> Result<Self, Error> {
        Ok(RawEvent {
            event_type: event.event_type().to_owned(),
            version: event.event_version(),
            payload: event.encode()?,
        })
    }

    /// Decodes into `E` with [`Event::decode`], without an aggregate type. Prefer
    /// [`EventEnvelope::decode`], which knows the aggregate type: an
    /// [`EventSet`](crate::EventSet) needs it when event type names repeat across its
    /// aggregates.
    ///
    /// # Errors
    ///
    /// Returns [`Error::UnknownEventType`] or [`Error::Serialization`].
    pub fn decode<E: Event>(&self) -> Result<E, Error> {
        E::decode(&self.event_type, self.version, &self.payload)
    }
}

impl EventEnvelope<RawEvent> {
    /// Decodes the raw event into `E` with [`Event::decode_from`] and the envelope's
    /// aggregate type (so an [`EventSet`](crate::EventSet) picks the right aggregate),
    /// keeping the envelope.
    ///
    /// # Errors
    ///
    /// Returns [`Error::UnknownEventType`] or [`Error::Serialization`], and
    /// [`Error::UnknownAggregateType`] when `E` is an event set that does not hold the
    /// aggregate type.
    pub fn decode<E: Event>(&self) -> Result<EventEnvelope<E>, Error> {
        let event = E::decode_from(
            &self.aggregate_type,
            &self.event.event_type,
            self.event.version,
            &self.event.payload,
        )?;
        Ok(EventEnvelope {
            id: self.id,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            position: self.position,
            timestamp: self.timestamp,
            metadata: self.metadata.clone(),
            event,
        })
    }
}
