//! One OpenTelemetry trace through the real pipeline, recorded by an in-memory exporter:
//! an HTTP request's span -> `Repository::execute` (`execute`, `load`, `append`) on a
//! `PgEventStore` -> the outbox -> `KafkaRelay` (`relay_publish`) -> the broker -> a
//! `KafkaConsumer` running a plain handler (`handle`) and another running a Postgres
//! projection (`project`).
//!
//! Needs the `opentelemetry` feature (scripts/test.sh runs it in its OpenTelemetry step),
//! Postgres and a Kafka-compatible broker.

#![cfg(feature = "opentelemetry")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry::trace::{SpanId, TraceContextExt as _, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use thalo::{Error, EventEnvelope, EventHandler, EventStore as _, Repository};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// The OpenTelemetry layer, process-wide (the relay and the consumers run on other
/// threads), exporting every span (all levels) to memory.
fn install_exporter() -> (SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("thalo-kafka-test")));
    tracing::subscriber::set_global_default(subscriber)
        .expect("this test binary installs the only subscriber");
    (provider, exporter)
}

/// For each event the plain handler saw: its aggregate id and the span it ran in.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, SpanId)>>>);

impl EventHandler<AccountEvent> for Seen {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        let span_id = tracing::Span::current()
            .context()
            .span()
            .span_context()
            .span_id();
        self.0
            .lock()
            .unwrap()
            .push((envelope.aggregate_id.clone(), span_id));
        Ok(())
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

/// The spans named `name` whose `aggregate_id` is `id`.
fn named<'a>(spans: &'a [SpanData], name: &str, id: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|span| {
            span.name == name && attribute(span, "aggregate_id") == Some(Value::from(id.to_owned()))
        })
        .collect()
}

/// The one span named `name` for aggregate `id`.
fn one<'a>(spans: &'a [SpanData], name: &str, id: &str) -> &'a SpanData {
    let found = named(spans, name, id);
    assert_eq!(
        found.len(),
        1,
        "one `{name}` span of {id}, found {}: {found:#?}",
        found.len()
    );
    found[0]
}

fn by_id(spans: &[SpanData], id: SpanId) -> &SpanData {
    spans
        .iter()
        .find(|span| span.span_context.span_id() == id)
        .unwrap_or_else(|| panic!("no span {id}"))
}

/// Executes a deposit on `account` inside an HTTP server span of its own; returns the
/// trace id of that request.
async fn request(repo: &Repository<thalo_postgres::PgEventStore>, account: &str) -> TraceId {
    let http = tracing::info_span!(
        "http_request",
        otel.kind = "server",
        http.method = "POST",
        http.route = "/accounts/{id}/deposits",
    );
    let trace_id = http.context().span().span_context().trace_id();
    repo.execute::<Account>(&account.to_owned(), AccountCommand::Deposit { amount: 5 })
        .instrument(http)
        .await
        .expect("execute");
    trace_id
}

/// Checks the spans of one request's command on `account`, all in trace `trace_id`:
/// `http_request` -> `execute` -> (`load`, `append`) -> `relay_publish` -> `handle`
/// (plain handler) and -> `project` (directly, when the projection applied the event in
/// a batch, or through its consumer's `handle` span). Returns the `execute` span id.
fn check_trace(spans: &[SpanData], account: &str, trace_id: TraceId, handler: SpanId) -> SpanId {
    let in_trace = |span: &SpanData, what: &str| {
        assert_eq!(
            span.span_context.trace_id(),
            trace_id,
            "{what} of {account} is in the request's trace: {span:#?}"
        );
    };

    let http = spans
        .iter()
        .find(|s| s.name == "http_request" && s.span_context.trace_id() == trace_id)
        .expect("the http_request span");
    assert_eq!(
        http.parent_span_id,
        SpanId::INVALID,
        "the request is the root"
    );
    assert_eq!(
        attribute(http, "http.route"),
        Some(Value::from("/accounts/{id}/deposits"))
    );

    let execute = one(spans, "execute", account);
    in_trace(execute, "execute");
    assert_eq!(execute.parent_span_id, http.span_context.span_id());
    assert!(attribute(execute, "attempt").is_some(), "{execute:#?}");
    assert_eq!(attribute(execute, "outcome"), Some(Value::from("stored")));
    let execute_id = execute.span_context.span_id();

    for name in ["load", "append"] {
        let span = one(spans, name, account);
        in_trace(span, name);
        assert_eq!(span.parent_span_id, execute_id, "{name} is in execute");
    }

    // The relay, in another task and with a batch span of its own, continues the trace
    // the event stored: its parent is the (remote) `execute` span, and it links to the
    // batch.
    let publish = one(spans, "relay_publish", account);
    in_trace(publish, "relay_publish");
    assert_eq!(publish.parent_span_id, execute_id);
    assert!(publish.parent_span_is_remote);
    assert!(attribute(publish, "offset").is_some(), "{publish:#?}");
    let batch = spans
        .iter()
        .find(|s| {
            s.name == "relay_batch"
                && publish
                    .links
                    .iter()
                    .any(|link| link.span_context.span_id() == s.span_context.span_id())
        })
        .expect("relay_publish links to its relay_batch span");
    assert_ne!(batch.span_context.trace_id(), trace_id);
    let publish_id = publish.span_context.span_id();

    // The plain handler's `handle` span: a child of `relay_publish`, whose context the
    // Kafka message carried.
    let handle = by_id(spans, handler);
    assert_eq!(handle.name, "handle");
    in_trace(handle, "handle");
    assert_eq!(handle.parent_span_id, publish_id);
    assert!(handle.parent_span_is_remote);

    // The projection's `project` span.
    let project = one(spans, "project", account);
    in_trace(project, "project");
    assert_eq!(
        attribute(project, "projection"),
        Some(Value::from("balances"))
    );
    assert_eq!(
        attribute(project, "outcome"),
        Some(Value::from("committed"))
    );
    if project.parent_span_id == publish_id {
        // Applied in a batch: linked to the batch's `consume` span.
        assert!(project.parent_span_is_remote);
        assert!(project.links.iter().any(|link| spans.iter().any(
            |s| s.name == "consume" && s.span_context.span_id() == link.span_context.span_id()
        )));
    } else {
        // Applied on its own: in the projection consumer's `handle` span.
        let parent = by_id(spans, project.parent_span_id);
        assert_eq!(parent.name, "handle", "{project:#?}");
        assert_ne!(parent.span_context.span_id(), handler);
        in_trace(parent, "the projection's handle");
        assert_eq!(parent.parent_span_id, publish_id);
    }
    execute_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_http_request_to_the_handler_and_the_projection() {
    let (_provider, exporter) = install_exporter();
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, _topic) = naming();
    let repo = Repository::new(db.store.clone());

    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (db.relay(&naming), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let seen = Seen::default();
    let handler_task = tokio::spawn(consumer(&naming).run(seen.clone(), shutdown.clone()));
    let projection_task = tokio::spawn(projection_consumer(&naming).run_projection(
        db.store.clone(),
        db.projection(),
        shutdown.clone(),
    ));

    // Two requests, two traces.
    let first = request(&repo, "acc-first").await;
    let second = request(&repo, "acc-second").await;
    assert_ne!(first, second);

    db.wait_until_projected(Duration::from_secs(60)).await;
    eventually(
        Duration::from_secs(60),
        "the handler to see both events",
        || async { seen.0.lock().unwrap().len() == 2 },
    )
    .await;
    // A span is exported when it closes: `relay_publish` at the acknowledgement, which
    // may come after the consumers got the message.
    let complete = |spans: &[SpanData]| {
        ["acc-first", "acc-second"].iter().all(|id| {
            ["relay_publish", "project"]
                .iter()
                .all(|name| !named(spans, name, id).is_empty())
        })
    };
    eventually(Duration::from_secs(30), "the spans to close", || {
        let spans = exporter.get_finished_spans().expect("spans");
        async move { complete(&spans) }
    })
    .await;

    let handled: Vec<(String, SpanId)> = seen.0.lock().unwrap().clone();
    let handler = |account: &str| {
        handled
            .iter()
            .find(|(id, _)| id == account)
            .map(|(_, span)| *span)
            .expect("handled")
    };
    let spans = exporter.get_finished_spans().expect("spans");
    let first_execute = check_trace(&spans, "acc-first", first, handler("acc-first"));
    check_trace(&spans, "acc-second", second, handler("acc-second"));

    // Nothing of one request is in the other's trace.
    for span in spans.iter().filter(|s| s.span_context.trace_id() == first) {
        assert_ne!(
            attribute(span, "aggregate_id"),
            Some(Value::from("acc-second")),
            "{span:#?}"
        );
    }
    for span in spans.iter().filter(|s| s.span_context.trace_id() == second) {
        assert_ne!(
            attribute(span, "aggregate_id"),
            Some(Value::from("acc-first")),
            "{span:#?}"
        );
    }

    // The store keeps the context of the command (`execute`); only the Kafka message
    // carries the relay's.
    let stored = db.store.read_all(0, 10).await.expect("read");
    let event = stored
        .iter()
        .find(|e| e.aggregate_id == "acc-first")
        .expect("stored");
    assert_eq!(
        event.metadata.traceparent(),
        Some(format!("00-{first}-{first_execute}-01").as_str())
    );

    shutdown.cancel();
    relay_task.await.expect("relay task").expect("relay");
    handler_task.await.expect("handler task").expect("handler");
    projection_task
        .await
        .expect("projection task")
        .expect("projection");
    db.drop_schema().await;
}
