//! The relay's and the consumer's spans, and the trace context they continue.
//!
//! Each batch a partition worker takes from its queue is a `consume` span (`topic`,
//! `partition`, `messages`), each message it handles on its own a `handle` span
//! (`topic`, `partition`, `offset`, `aggregate_type`, `aggregate_id`, `sequence`,
//! `event_type`, `traceparent`), a child of the `consume` span. With the
//! `opentelemetry` feature, a `handle` span whose message has a valid `traceparent`
//! header continues that trace instead: its OpenTelemetry parent is the remote span the
//! header names (the relay's `relay_publish` span, see below, or else the `execute`
//! span of the command that stored the event, when `thalo`'s `opentelemetry` feature
//! put it there). A batch that a projection applies in one transaction is one unit of
//! work, so it has no `handle` spans: its `consume` span links to the trace context of
//! each of its messages instead, as OpenTelemetry's messaging conventions do for
//! batches.
//!
//! With the `opentelemetry` feature, and `tracing-opentelemetry`'s layer recording the
//! spans, two more spans put the relay and the projections into the trace of the
//! request that issued a command:
//!
//! - `relay_publish` (relay, per event that carries a `traceparent`): a child of the
//!   event's stored trace context (the `execute` span), linked to the `relay_batch` span
//!   that published it, open from the send until the broker's acknowledgement. Its own
//!   context replaces the stored one in the message's `traceparent` header, as the
//!   OpenTelemetry messaging conventions have producers do, so the consumers' spans are
//!   its children. (The event in the store keeps the `execute` context.)
//! - `project` (a Postgres projection run by `KafkaConsumer::run_projection`, per event
//!   that carries a `traceparent`): the event's share of the transaction that applied
//!   it. In a batch, its parent is the event's trace context (the `relay_publish` span)
//!   and it links to the batch's `consume` span; for a message applied on its own, it is
//!   a child of that message's `handle` span, which continues the same trace.
//!
//! Both are made only when the span they hang from (`relay_batch`, or the consumer's
//! current span) is recorded by OpenTelemetry, checked once per batch (without a
//! subscriber that wants them, the relay and the projections do no per-event work), and
//! then only for events that carry a trace context (one metadata lookup per event).

use rdkafka::message::Headers;
use rdkafka::Message;
use thalo::Metadata;
#[cfg(feature = "postgres")]
use thalo::{EventEnvelope, RawEvent};
use tracing::Span;

use crate::message::header;

/// What the spans record of a message's headers; `None` for what is missing or invalid
/// (a message that cannot be decoded still gets its span).
#[derive(Debug, Default)]
struct TraceFields<'a> {
    aggregate_type: Option<&'a str>,
    aggregate_id: Option<&'a str>,
    sequence: Option<u64>,
    event_type: Option<&'a str>,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl<'a> TraceFields<'a> {
    /// Reads the headers only: no copy of the payload, no decoding of the event.
    fn of<M: Message>(message: &'a M) -> Self {
        let mut fields = TraceFields::default();
        let Some(headers) = message.headers() else {
            return fields;
        };
        for h in headers.iter() {
            let Some(value) = h.value.and_then(|v| std::str::from_utf8(v).ok()) else {
                continue;
            };
            match h.key {
                header::AGGREGATE_TYPE => fields.aggregate_type = Some(value),
                header::AGGREGATE_ID => fields.aggregate_id = Some(value),
                header::SEQUENCE => fields.sequence = value.parse().ok(),
                header::CE_TYPE => fields.event_type = Some(value),
                header::TRACEPARENT if Metadata::is_valid_traceparent(value) => {
                    fields.traceparent = Some(value);
                }
                header::TRACESTATE => fields.tracestate = Some(value),
                _ => {}
            }
        }
        fields
    }
}

/// The span of one batch a partition worker took, starting with `first`: one message
/// until the worker records how many it took.
pub(crate) fn consume_span<M: Message>(first: &M) -> Span {
    tracing::info_span!(
        "consume",
        topic = first.topic(),
        partition = first.partition(),
        messages = 1_u64,
    )
}

/// With the `opentelemetry` feature, links `consume` to the trace context of each
/// message of `batch` (when it has more than one: a single message's `handle` span
/// continues its trace itself).
pub(crate) fn link_messages<M: Message>(consume: &Span, batch: &[M]) {
    #[cfg(feature = "opentelemetry")]
    if batch.len() > 1 {
        for message in batch {
            let fields = TraceFields::of(message);
            if let Some(remote) = fields
                .traceparent
                .and_then(|traceparent| otel::remote_context(traceparent, fields.tracestate))
            {
                tracing_opentelemetry::OpenTelemetrySpanExt::add_link(consume, remote);
            }
        }
    }
    #[cfg(not(feature = "opentelemetry"))]
    let _ = (consume, batch);
}

/// The span of handling `message`, a child of `consume` (or of the current span when
/// `consume` is disabled); with the `opentelemetry` feature, it continues the trace of
/// the message's `traceparent` header.
pub(crate) fn handle_span<M: Message>(consume: &Span, message: &M) -> Span {
    let fields = TraceFields::of(message);
    let parent = if consume.is_disabled() {
        Span::current()
    } else {
        consume.clone()
    };
    let span = tracing::info_span!(
        parent: &parent,
        "handle",
        topic = message.topic(),
        partition = message.partition(),
        offset = message.offset(),
        aggregate_type = fields.aggregate_type,
        aggregate_id = fields.aggregate_id,
        sequence = fields.sequence,
        event_type = fields.event_type,
        traceparent = fields.traceparent,
    );
    #[cfg(feature = "opentelemetry")]
    if let Some(remote) = fields
        .traceparent
        .and_then(|traceparent| otel::remote_context(traceparent, fields.tracestate))
    {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        // Fails only without the OpenTelemetry layer or for a span it does not see:
        // there is no trace to continue then.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    span
}

/// The relay's `relay_batch` span, as the `relay_publish` spans of its events see it:
/// looked at once, at the batch's first event.
#[cfg(feature = "postgres")]
#[derive(Debug, Default)]
pub(crate) struct RelayBatch {
    /// `None` until looked at; then the batch span's OpenTelemetry context, `None` when
    /// it has none (no OpenTelemetry layer, or the span is filtered out).
    #[cfg(feature = "opentelemetry")]
    context: Option<Option<opentelemetry::trace::SpanContext>>,
}

/// A `relay_publish` span, and the `traceparent` its message carries instead of the
/// stored one.
#[cfg(feature = "postgres")]
#[derive(Debug)]
pub(crate) struct Publish {
    pub(crate) span: Span,
    pub(crate) traceparent: String,
}

#[cfg(feature = "postgres")]
impl Publish {
    /// Records the broker's acknowledgement.
    pub(crate) fn delivered(&self, partition: i32, offset: i64) {
        self.span.record("partition", partition);
        self.span.record("offset", offset);
    }

    /// Records why the message was not delivered.
    pub(crate) fn failed(&self, error: &str) {
        self.span.record("error", error);
        self.span.record("otel.status_code", "ERROR");
    }
}

/// The `relay_publish` span of publishing `envelope` (outbox row `outbox_id`) to
/// `topic`, called in the `relay_batch` span: `Some` only with the `opentelemetry`
/// feature, for an event that carries a `traceparent`, in a batch whose span
/// OpenTelemetry records. Its parent is the event's trace context, and it links to the
/// batch.
#[cfg(feature = "postgres")]
pub(crate) fn publish_span(
    batch: &mut RelayBatch,
    envelope: &EventEnvelope<RawEvent>,
    topic: &str,
    outbox_id: i64,
) -> Option<Publish> {
    #[cfg(feature = "opentelemetry")]
    {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;

        // Nothing records the batch: no per-event work at all.
        let batch_context = batch
            .context
            .get_or_insert_with(|| otel::valid_context(&Span::current()))
            .as_ref()?;
        let traceparent = envelope.metadata.traceparent()?;
        let remote = otel::remote_context(traceparent, envelope.metadata.tracestate())?;
        let span = tracing::info_span!(
            "relay_publish",
            otel.kind = "producer",
            topic,
            aggregate_type = envelope.aggregate_type.as_str(),
            aggregate_id = envelope.aggregate_id.as_str(),
            sequence = envelope.sequence,
            event_type = envelope.event.event_type.as_str(),
            outbox_id,
            partition = tracing::field::Empty,
            offset = tracing::field::Empty,
            error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if span
            .set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
            .is_err()
        {
            return None;
        }
        span.add_link(batch_context.clone());
        let traceparent = otel::traceparent_of(&span)?;
        Some(Publish { span, traceparent })
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = (batch, envelope, topic, outbox_id);
        None
    }
}

/// The `project` spans of the events of `envelopes` that carry a trace context, which
/// projection `projection` is about to apply in one transaction, called in the
/// consumer's current span (the batch's `consume` span, or the message's `handle` span):
/// empty without the `opentelemetry` feature, or when OpenTelemetry does not record the
/// current span. Each span is open until the caller drops it (after the transaction),
/// with the event's trace context as parent and a link to the batch (or, when the
/// current span continues the event's trace already, as that span's child).
#[cfg(feature = "postgres")]
pub(crate) fn project_spans<E>(projection: &str, envelopes: &[EventEnvelope<E>]) -> Vec<Span> {
    #[cfg(feature = "opentelemetry")]
    {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;

        let mut spans = Vec::new();
        // Nothing records the consumer's span: no per-event work at all.
        let Some(current) = otel::valid_context(&Span::current()) else {
            return spans;
        };
        // An integer attribute (OpenTelemetry has no unsigned ones).
        let batch = i64::try_from(envelopes.len()).unwrap_or(i64::MAX);
        for envelope in envelopes {
            let Some(traceparent) = envelope.metadata.traceparent() else {
                continue;
            };
            let Some(remote) = otel::remote_context(traceparent, envelope.metadata.tracestate())
            else {
                continue;
            };
            let span = tracing::info_span!(
                "project",
                projection,
                aggregate_type = envelope.aggregate_type.as_str(),
                aggregate_id = envelope.aggregate_id.as_str(),
                sequence = envelope.sequence,
                batch,
                outcome = tracing::field::Empty,
                error = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            if span.is_disabled() {
                return spans;
            }
            if current.trace_id() != remote.trace_id() {
                // Fails only for a span the layer does not see: it stays in the batch's
                // trace then.
                let _ =
                    span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
                span.add_link(current.clone());
            }
            spans.push(span);
        }
        spans
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = (projection, envelopes);
        Vec::new()
    }
}

/// Records how the transaction of the events of `spans` ended.
#[cfg(feature = "postgres")]
pub(crate) fn record_projected<T>(spans: &[Span], result: &Result<T, thalo::Error>) {
    let Err(err) = result else {
        for span in spans {
            span.record("outcome", "committed");
        }
        return;
    };
    if spans.is_empty() {
        return;
    }
    let error = crate::message::error_chain(err);
    for span in spans {
        span.record("outcome", "rolled_back");
        span.record("error", error.as_str());
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    #[cfg(feature = "postgres")]
    use {
        opentelemetry::trace::TraceContextExt as _, tracing::Span,
        tracing_opentelemetry::OpenTelemetrySpanExt as _,
    };

    /// `span`'s OpenTelemetry span context, when it has a valid one (the span is
    /// enabled and `tracing-opentelemetry`'s layer records it).
    #[cfg(feature = "postgres")]
    pub(super) fn valid_context(span: &Span) -> Option<SpanContext> {
        if span.is_disabled() {
            return None;
        }
        let context = span.context().span().span_context().clone();
        context.is_valid().then_some(context)
    }

    /// The `traceparent` of `span`'s OpenTelemetry context, when it has a valid one.
    #[cfg(feature = "postgres")]
    pub(super) fn traceparent_of(span: &Span) -> Option<String> {
        let context = valid_context(span)?;
        Some(format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        ))
    }

    /// The remote span context a valid `traceparent` (and `tracestate`) names.
    pub(super) fn remote_context(
        traceparent: &str,
        tracestate: Option<&str>,
    ) -> Option<SpanContext> {
        let trace_id = TraceId::from_hex(traceparent.get(3..35)?).ok()?;
        let span_id = SpanId::from_hex(traceparent.get(36..52)?).ok()?;
        let flags = u8::from_str_radix(traceparent.get(53..55)?, 16).ok()?;
        // An invalid `tracestate` is dropped, the `traceparent` still counts (W3C).
        let state = tracestate
            .and_then(|state| state.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(
            trace_id,
            span_id,
            // Only the sampled flag is defined (version 00).
            TraceFlags::new(flags) & TraceFlags::SAMPLED,
            true,
            state,
        );
        context.is_valid().then_some(context)
    }
}

#[cfg(all(test, feature = "opentelemetry"))]
mod tests {
    use opentelemetry::trace::{SpanId, TracerProvider as _};
    use opentelemetry::Value;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;
    use thalo::{
        commands, events, Aggregate, Error, EventStore as _, InMemoryEventStore, Repository,
    };
    use tracing::Instrument as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;
    use crate::encode_headers;

    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Tally {
        #[identity]
        id: u64,
        total: u64,
    }

    #[commands]
    impl Tally {
        pub fn add(&self, by: u64) -> Result<AddedEvent, Error> {
            Ok(AddedEvent { by })
        }
    }

    #[events]
    impl Tally {
        pub fn added(&mut self, by: u64) {
            self.total = self.total.saturating_add(by);
        }
    }

    fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| panic!("no `{name}` span in {spans:#?}"))
    }

    fn attribute(span: &SpanData, key: &str) -> Option<Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.clone())
    }

    /// HTTP request -> `Repository::execute` -> the stored event's metadata -> the Kafka
    /// message the relay writes -> the consumer's `handle` span: one trace.
    #[tokio::test]
    async fn the_handle_span_continues_the_trace_of_the_command() -> Result<(), Error> {
        let (exporter, _default) = recording();

        let repo = Repository::new(InMemoryEventStore::new());
        let request = tracing::info_span!("http request");
        repo.execute::<Tally>(&7, TallyCommand::Add { by: 2 })
            .instrument(request.clone())
            .await?;
        drop(request);

        // The relay publishes what the store has, with `encode_headers`.
        let stored = repo.store().read_all(0, 10).await?;
        let traceparent = stored[0]
            .metadata
            .traceparent()
            .expect("execute stored a traceparent")
            .to_owned();
        let message = OwnedMessage::new(
            Some(stored[0].event.payload.clone().into_bytes()),
            Some(b"7".to_vec()),
            "tally".into(),
            Timestamp::NotAvailable,
            3,
            41,
            Some(encode_headers(&stored[0])),
        );
        let consume = consume_span(&message);
        let handle = handle_span(&consume, &message);
        async {}.instrument(handle).await;
        drop(consume);

        let spans = exporter.get_finished_spans().expect("exported spans");
        let root = span(&spans, "http request");
        let execute = span(&spans, "execute");
        let handle = span(&spans, "handle");
        let consume = span(&spans, "consume");
        let trace_id = root.span_context.trace_id();

        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_eq!(execute.parent_span_id, root.span_context.span_id());
        assert_eq!(execute.span_context.trace_id(), trace_id);
        // The consumer's span is in the request's trace, under the span that stored the
        // event, across the (remote) process boundary.
        assert_eq!(handle.span_context.trace_id(), trace_id);
        assert_eq!(handle.parent_span_id, execute.span_context.span_id());
        assert!(handle.parent_span_is_remote);
        assert_eq!(
            traceparent,
            format!("00-{trace_id}-{}-01", execute.span_context.span_id())
        );
        assert_eq!(
            attribute(handle, "traceparent"),
            Some(Value::from(traceparent))
        );
        assert_eq!(attribute(handle, "offset"), Some(Value::I64(41)));
        assert_eq!(
            attribute(handle, "aggregate_type"),
            Some(Value::from("tally"))
        );
        assert_eq!(attribute(handle, "event_type"), Some(Value::from("Added")));
        // Without a trace context of its own, the batch span starts a trace of its own.
        assert_ne!(consume.span_context.trace_id(), trace_id);
        Ok(())
    }

    #[cfg(feature = "postgres")]
    fn raw(id: &str, traceparent: Option<&str>) -> EventEnvelope<RawEvent> {
        let mut metadata = Metadata::new();
        if let Some(traceparent) = traceparent {
            metadata = metadata.with_traceparent(traceparent);
        }
        EventEnvelope {
            id: uuid::Uuid::new_v4(),
            aggregate_type: "tally".into(),
            aggregate_id: id.into(),
            sequence: 1,
            position: 1,
            timestamp: chrono::Utc::now(),
            metadata,
            event: RawEvent {
                event_type: "Added".into(),
                version: 1,
                payload: "{}".into(),
            },
        }
    }

    /// Spans recorded into an in-memory exporter, on this thread, until the guard drops.
    fn recording() -> (InMemorySpanExporter, tracing::subscriber::DefaultGuard) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        (exporter, tracing::subscriber::set_default(subscriber))
    }

    #[cfg(feature = "postgres")]
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    #[cfg(feature = "postgres")]
    const OTHER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// `relay_publish`: a child of the stored context, linked to its `relay_batch`, and
    /// the context its message carries; only for traced events.
    #[cfg(feature = "postgres")]
    #[test]
    fn relay_publish_continues_the_stored_trace() {
        let (exporter, _default) = recording();
        let batch_span = tracing::info_span!("relay_batch");
        let publish = batch_span.in_scope(|| {
            let mut batch = RelayBatch::default();
            assert!(publish_span(&mut batch, &raw("a", None), "tally", 1).is_none());
            let publish = publish_span(&mut batch, &raw("b", Some(PARENT)), "tally", 2)
                .expect("a traced event gets a span");
            publish.delivered(4, 17);
            publish
        });
        let traceparent = publish.traceparent.clone();
        drop(publish);
        drop(batch_span);

        let spans = exporter.get_finished_spans().expect("exported spans");
        let batch = span(&spans, "relay_batch");
        let publish = span(&spans, "relay_publish");
        assert_eq!(spans.len(), 2, "no span for the untraced event");
        assert_eq!(
            publish.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(publish.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(publish.parent_span_is_remote);
        assert_eq!(publish.links.len(), 1);
        assert_eq!(publish.links[0].span_context, batch.span_context);
        assert_eq!(
            traceparent,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                publish.span_context.span_id()
            )
        );
        assert_eq!(attribute(publish, "offset"), Some(Value::I64(17)));
        assert_eq!(attribute(publish, "aggregate_id"), Some(Value::from("b")));
    }

    /// Without an OpenTelemetry layer there is nothing to continue: no span.
    #[cfg(feature = "postgres")]
    #[test]
    fn no_relay_publish_span_without_opentelemetry() {
        let _default = tracing::subscriber::set_default(tracing_subscriber::registry());
        let batch_span = tracing::info_span!("relay_batch");
        batch_span.in_scope(|| {
            let mut batch = RelayBatch::default();
            assert!(publish_span(&mut batch, &raw("b", Some(PARENT)), "tally", 2).is_none());
        });
        let tally = raw("b", Some(PARENT));
        assert!(project_spans("p", std::slice::from_ref(&tally)).is_empty());
    }

    /// `project` in a batch: the event's context is the parent, the batch a link; in a
    /// `handle` span that continues the event's trace already: a child of it.
    #[cfg(feature = "postgres")]
    #[test]
    fn project_spans_continue_each_events_trace() {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;

        let (exporter, _default) = recording();
        let consume = tracing::info_span!("consume");
        let envelopes = [
            raw("a", Some(PARENT)),
            raw("b", None),
            raw("c", Some(OTHER)),
        ];
        let spans = consume.in_scope(|| project_spans("balances", &envelopes));
        assert_eq!(spans.len(), 2, "one per traced event");
        record_projected(&spans, &Ok(()));
        drop(spans);
        drop(consume);

        let handle = tracing::info_span!("handle");
        let remote = otel::remote_context(OTHER, None).expect("valid");
        let _ = handle.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        let alone = handle.in_scope(|| project_spans("balances", &envelopes[2..]));
        record_projected(&alone, &Err::<(), _>(Error::handler("balances", "boom")));
        drop(alone);
        drop(handle);

        let exported = exporter.get_finished_spans().expect("exported spans");
        let consume = span(&exported, "consume");
        let handle = span(&exported, "handle");
        let projects: Vec<&SpanData> = exported.iter().filter(|s| s.name == "project").collect();
        assert_eq!(projects.len(), 3);
        let (a, c, alone) = (projects[0], projects[1], projects[2]);
        assert_eq!(a.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(
            a.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(c.parent_span_id.to_string(), "b7ad6b7169203331");
        for span in [a, c] {
            assert!(span.parent_span_is_remote);
            assert_eq!(span.links.len(), 1);
            assert_eq!(span.links[0].span_context, consume.span_context);
            assert_eq!(attribute(span, "outcome"), Some(Value::from("committed")));
            assert_eq!(attribute(span, "batch"), Some(Value::I64(3)));
        }
        assert_eq!(alone.parent_span_id, handle.span_context.span_id());
        assert_eq!(
            alone.span_context.trace_id(),
            handle.span_context.trace_id()
        );
        assert!(alone.links.is_empty());
        assert_eq!(
            attribute(alone, "outcome"),
            Some(Value::from("rolled_back"))
        );
        assert_eq!(
            attribute(alone, "projection"),
            Some(Value::from("balances"))
        );
    }

    #[test]
    fn only_valid_trace_context_is_continued() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let remote = otel::remote_context(parent, Some("rojo=1,congo")).expect("valid");
        assert!(remote.is_remote() && remote.is_sampled());
        assert_eq!(
            remote.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(remote.trace_state().header(), "");
        let state = otel::remote_context(parent, Some("rojo=1")).expect("valid");
        assert_eq!(state.trace_state().header(), "rojo=1");
        assert!(otel::remote_context("00-xyz", None).is_none());
    }
}
