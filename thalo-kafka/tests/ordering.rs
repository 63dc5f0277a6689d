//! Every aggregate's events reach Kafka, and every handler, in sequence order.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rdkafka::Message;
use thalo::{Error, EventEnvelope, EventHandler, EventStore, Metadata};
use tokio_util::sync::CancellationToken;

const AGGREGATES: usize = 40;
const EVENTS_PER_AGGREGATE: u64 = 50;

/// Records the sequences each handler call sees, per aggregate.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<String, Vec<u64>>>>);

impl EventHandler<AccountEvent> for Recorder {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        // Yield so partitions interleave on the runtime.
        tokio::task::yield_now().await;
        self.0
            .lock()
            .unwrap()
            .entry(envelope.aggregate_id.clone())
            .or_default()
            .push(envelope.sequence);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_each_aggregate_arrive_in_sequence_order() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();
    let settings = topic_settings().with_partitions(4);

    let shutdown = CancellationToken::new();
    // Small batches: many batches, each mixing many aggregates.
    let relay = db
        .relay(&naming)
        .with_topic_settings(settings.clone())
        .with_batch_size(100);
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let recorder = Recorder::default();
    let consumer_task = tokio::spawn(
        consumer(&naming)
            .with_topic_settings(settings)
            .run(recorder.clone(), shutdown.clone()),
    );

    // Concurrent writers, one per aggregate, appending one or two events at a time, so
    // the outbox interleaves the aggregates.
    let mut writers = Vec::new();
    for a in 0..AGGREGATES {
        let store = db.store.clone();
        writers.push(tokio::spawn(async move {
            let id = format!("acc-{a}");
            let mut version = 0;
            while version < EVENTS_PER_AGGREGATE {
                let n = if version % 3 == 0 { 2 } else { 1 }.min(EVENTS_PER_AGGREGATE - version);
                let events = (0..n)
                    .map(|i| {
                        AccountEvent::Deposited(DepositedEvent {
                            amount: (version + i + 1) as i64,
                        })
                    })
                    .collect();
                store
                    .append::<Account>(&id, version, events, &Metadata::default())
                    .await
                    .expect("append");
                version += n;
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let total = AGGREGATES * EVENTS_PER_AGGREGATE as usize;

    // What is in Kafka: per key, exactly 1..=N in offset order (no crash, no duplicates).
    let messages = read_topic(&topic, total, Duration::from_secs(60)).await;
    assert_eq!(messages.len(), total, "every event is in Kafka");
    let mut partitions_of: HashMap<String, i32> = HashMap::new();
    let mut by_key: HashMap<String, Vec<u64>> = HashMap::new();
    let mut by_partition: HashMap<i32, Vec<&rdkafka::message::OwnedMessage>> = HashMap::new();
    for m in &messages {
        by_partition.entry(m.partition()).or_default().push(m);
    }
    for (_, mut list) in by_partition {
        list.sort_by_key(|m| m.offset());
        for m in list {
            let key = String::from_utf8(m.key().expect("key").to_vec()).expect("utf-8 key");
            let previous = partitions_of.insert(key.clone(), m.partition());
            assert!(
                previous.is_none_or(|p| p == m.partition()),
                "{key} is in one partition"
            );
            let sequence: u64 = header(m, "thalo_sequence")
                .expect("sequence")
                .parse()
                .expect("number");
            by_key.entry(key).or_default().push(sequence);
        }
    }
    let expected: Vec<u64> = (1..=EVENTS_PER_AGGREGATE).collect();
    assert_eq!(by_key.len(), AGGREGATES);
    for (key, sequences) in &by_key {
        assert_eq!(sequences, &expected, "Kafka order of {key}");
    }
    let used: std::collections::HashSet<i32> = partitions_of.values().copied().collect();
    assert!(
        used.len() > 1,
        "the aggregates spread over several partitions"
    );

    // What the handler saw: the same order, partitions handled concurrently.
    eventually(
        Duration::from_secs(60),
        "the handler to see every event",
        || async {
            recorder
                .0
                .lock()
                .unwrap()
                .values()
                .map(Vec::len)
                .sum::<usize>()
                >= total
        },
    )
    .await;
    for (key, sequences) in recorder.0.lock().unwrap().iter() {
        assert_eq!(sequences, &expected, "handler order of {key}");
    }

    shutdown.cancel();
    relay_task.await.expect("relay task").expect("relay");
    let stats = consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    assert_eq!(stats.handled, total as u64);
    db.drop_schema().await;
}
