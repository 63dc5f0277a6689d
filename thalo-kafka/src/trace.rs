//! The consumer's spans, and the trace context they continue.
//!
//! Each batch a partition worker takes from its queue is a `consume` span (`topic`,
//! `partition`, `messages`), each message it handles on its own a `handle` span
//! (`topic`, `partition`, `offset`, `aggregate_type`, `aggregate_id`, `sequence`,
//! `event_type`, `traceparent`), a child of the `consume` span. With the
//! `opentelemetry` feature, a `handle` span whose message has a valid `traceparent`
//! header continues that trace instead: its OpenTelemetry parent is the remote span the
//! header names (the `execute` span of the command that stored the event, when
//! `thalo`'s `opentelemetry` feature put it there). A batch that a projection applies
//! in one transaction is one unit of work, so it has no `handle` spans: its `consume`
//! span links to the trace context of each of its messages instead, as OpenTelemetry's
//! messaging conventions do for batches.

use rdkafka::message::Headers;
use rdkafka::Message;
use thalo::Metadata;
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

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

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
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _default = tracing::subscriber::set_default(subscriber);

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
