//! The W3C trace context through the real pipeline: `Repository` -> `PgEventStore` ->
//! outbox -> relay -> the Kafka headers `traceparent`/`tracestate` -> consumer -> the
//! handler's envelope.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use thalo::{Error, EventEnvelope, EventHandler, Metadata, Repository};
use tokio_util::sync::CancellationToken;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const STATE: &str = "rojo=00f067aa0ba902b7";

/// The metadata of every event the handler sees.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Metadata>>>);

impl EventHandler<AccountEvent> for Seen {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        self.0.lock().unwrap().push(envelope.metadata.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_context_reaches_kafka_and_the_handler() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();

    let repo = Repository::new(db.store.clone());
    let metadata = Metadata::new()
        .with_traceparent(PARENT)
        .with_tracestate(STATE);
    repo.execute_with::<Account>(
        &"acc-trace".to_string(),
        AccountCommand::Deposit { amount: 5 },
        &metadata,
    )
    .await
    .expect("execute");

    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (db.relay(&naming), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let seen = Seen::default();
    let consumer_task = tokio::spawn(consumer(&naming).run(seen.clone(), shutdown.clone()));

    // In Kafka: the standard headers, for any instrumented client.
    let messages = read_topic(&topic, 1, Duration::from_secs(30)).await;
    assert_eq!(messages.len(), 1, "the event reaches Kafka");
    assert_eq!(header(&messages[0], "traceparent").as_deref(), Some(PARENT));
    assert_eq!(header(&messages[0], "tracestate").as_deref(), Some(STATE));

    // In the handler: back in the metadata.
    eventually(
        Duration::from_secs(30),
        "the handler to see the event",
        || async { !seen.0.lock().unwrap().is_empty() },
    )
    .await;
    let handled = seen.0.lock().unwrap()[0].clone();
    assert_eq!(handled.traceparent(), Some(PARENT));
    assert_eq!(handled.tracestate(), Some(STATE));

    shutdown.cancel();
    relay_task.await.expect("relay task").expect("relay");
    let stats = consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    assert_eq!(stats.handled, 1);
    db.drop_schema().await;
}
