//! The W3C trace context on events: what `Metadata` accepts, what `Repository::execute`
//! stores, and (feature `opentelemetry`) the context it takes from the current span.

use thalo::{
    commands, events, Aggregate, CommandId, Error, EventStore as _, InMemoryEventStore, Metadata,
    Repository,
};

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

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const STATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";

#[test]
fn metadata_keeps_only_valid_trace_context() {
    let metadata = Metadata::new()
        .with_traceparent(PARENT)
        .with_tracestate(STATE);
    assert_eq!(metadata.traceparent(), Some(PARENT));
    assert_eq!(metadata.tracestate(), Some(STATE));
    assert_eq!(metadata.headers[Metadata::TRACEPARENT], PARENT);
    assert_eq!(metadata.headers[Metadata::TRACESTATE], STATE);

    // An invalid value leaves the metadata as it was.
    for invalid in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ] {
        assert!(!Metadata::is_valid_traceparent(invalid), "{invalid}");
        assert_eq!(metadata.clone().with_traceparent(invalid), metadata);
        assert!(Metadata::new().with_traceparent(invalid).is_empty());
    }
    assert!(Metadata::new().with_tracestate("a=1\u{7f}").is_empty());

    // Set around the validation, an invalid value is not reported as the traceparent.
    let raw = Metadata::new().with_header(Metadata::TRACEPARENT, "garbage");
    assert_eq!(raw.traceparent(), None);
}

#[tokio::test]
async fn execute_stores_the_trace_context_in_every_event() -> Result<(), Error> {
    let repo = Repository::new(InMemoryEventStore::new());
    let metadata = Metadata::new()
        .with_traceparent(PARENT)
        .with_tracestate(STATE);

    let stored = repo
        .execute_with::<Tally>(&1, TallyCommand::Add { by: 2 }, &metadata)
        .await?;
    assert_eq!(stored[0].metadata.traceparent(), Some(PARENT));
    assert_eq!(stored[0].metadata.tracestate(), Some(STATE));

    // Keyed commands too, next to the command id.
    let key = CommandId::new("trace-1")?;
    let once = repo
        .execute_once_with::<Tally>(&1, key.clone(), TallyCommand::Add { by: 3 }, &metadata)
        .await?;
    assert_eq!(once.events()[0].metadata.traceparent(), Some(PARENT));
    assert_eq!(once.events()[0].metadata.command_id, Some(key));

    // What the store keeps, not just what execute returned.
    let read = repo.store().read_stream::<Tally>(&1, 0).await?;
    assert_eq!(read.len(), 2);
    for envelope in &read {
        assert_eq!(envelope.metadata.traceparent(), Some(PARENT));
        assert_eq!(envelope.metadata.tracestate(), Some(STATE));
    }

    // Without a trace context (and without an OpenTelemetry layer), none is made up.
    let plain = repo
        .execute::<Tally>(&2, TallyCommand::Add { by: 1 })
        .await?;
    assert_eq!(plain[0].metadata.traceparent(), None);
    Ok(())
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{SpanId, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing::Instrument as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| panic!("no `{name}` span in {spans:#?}"))
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

    #[tokio::test]
    async fn execute_stores_the_execute_spans_context() -> Result<(), Error> {
        let (exporter, _default) = recording();

        let repo = Repository::new(InMemoryEventStore::new());
        let request = tracing::info_span!("http request");
        let stored = repo
            .execute::<Tally>(&1, TallyCommand::Add { by: 2 })
            .instrument(request.clone())
            .await?;
        // A caller's own traceparent wins.
        let explicit = repo
            .execute_with::<Tally>(
                &1,
                TallyCommand::Add { by: 2 },
                &Metadata::new().with_traceparent(PARENT),
            )
            .instrument(request.clone())
            .await?;
        drop(request);

        let spans = exporter.get_finished_spans().expect("exported spans");
        let root = span(&spans, "http request");
        let execute = span(&spans, "execute");
        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_eq!(execute.parent_span_id, root.span_context.span_id());
        assert_eq!(
            execute.span_context.trace_id(),
            root.span_context.trace_id()
        );

        let traceparent = stored[0].metadata.traceparent().expect("a traceparent");
        assert_eq!(
            traceparent,
            format!(
                "00-{}-{}-01",
                root.span_context.trace_id(),
                execute.span_context.span_id()
            )
        );
        assert_eq!(explicit[0].metadata.traceparent(), Some(PARENT));
        Ok(())
    }

    #[derive(Debug, thiserror::Error, thalo::ErrorCode)]
    pub enum GateError {
        #[error("the gate is closed")]
        Closed,
    }

    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Gate {
        #[identity]
        id: u64,
    }

    #[commands]
    impl Gate {
        pub fn pass(&self) -> Result<PassedEvent, GateError> {
            Err(GateError::Closed)
        }
    }

    #[events]
    impl Gate {
        pub fn passed(&mut self) {}
    }

    /// A rejected command's `execute` span says why: its outcome and the rejection's
    /// code, a domain error's (`ErrorCode`) as well as an invariant's.
    #[tokio::test]
    async fn a_rejections_code_is_on_the_execute_span() {
        let (exporter, _default) = recording();

        let repo = Repository::new(InMemoryEventStore::new());
        let err = repo
            .execute::<Gate>(&7, GateCommand::Pass {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("CLOSED"));

        let spans = exporter.get_finished_spans().expect("exported spans");
        let execute = span(&spans, "execute");
        let attribute = |key: &str| {
            execute
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attribute("outcome").as_deref(), Some("rejected"));
        assert_eq!(attribute("code").as_deref(), Some("CLOSED"));
        assert_eq!(attribute("aggregate_type").as_deref(), Some("gate"));
    }
}
