//! Fencing: a relay leader that lost its leadership while its broker hung publishes
//! nothing more, and the consumers drop whatever it had already sent, so a handler
//! never sees an aggregate's sequence go backwards.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use thalo::{Error, EventEnvelope, EventHandler, EventStore, Metadata};
use thalo_kafka::{KafkaConsumer, KafkaRelay};
use tokio_util::sync::CancellationToken;

/// Records each aggregate's sequences in arrival order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<String, Vec<u64>>>>);

impl EventHandler<AccountEvent> for Recorder {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
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
async fn a_deposed_leader_never_makes_a_sequence_go_backwards() {
    let db = TestDb::new().await;
    let broker = OwnBroker::start().await;
    let (naming, _topic) = naming();
    let relay = |name: &str| {
        KafkaRelay::from_store(&db.store, broker.brokers())
            .with_topic_naming(naming.clone())
            .with_topic_settings(topic_settings())
            .with_poll_interval(Duration::from_millis(100))
            .with_lock_retry_interval(Duration::from_millis(200))
            .with_delivery_timeout(Duration::from_secs(3))
            .with_batch_size(50)
            .set("client.id", name)
    };
    let stop = CancellationToken::new();
    let a = relay("relay-a");
    let a_task = tokio::spawn({
        let (a, stop) = (a.clone(), stop.clone());
        async move { a.run(stop).await }
    });
    eventually(Duration::from_secs(30), "relay A to lead", || async {
        a.status().active
    })
    .await;
    let b = relay("relay-b");
    let b_task = tokio::spawn({
        let (b, stop) = (b.clone(), stop.clone());
        async move { b.run(stop).await }
    });

    let recorder = Recorder::default();
    let consumer = KafkaConsumer::new(broker.brokers(), random_name("group"))
        .with_topic_naming(naming.clone())
        .with_topic_settings(topic_settings())
        .subscribe::<Account>()
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500");
    let consumer_task = tokio::spawn(consumer.run(recorder.clone(), stop.clone()));

    // Writers keep appending to a few accounts all along.
    let writing = Arc::new(AtomicBool::new(true));
    let accounts = 5;
    let writer = tokio::spawn({
        let (store, writing) = (db.store.clone(), Arc::clone(&writing));
        async move {
            let mut versions = vec![0_u64; accounts];
            while writing.load(Ordering::SeqCst) {
                for (a, version) in versions.iter_mut().enumerate() {
                    store
                        .append::<Account>(
                            &format!("acc-{a}"),
                            *version,
                            vec![AccountEvent::Deposited(DepositedEvent { amount: 1 })],
                            &Metadata::default(),
                        )
                        .await
                        .expect("append");
                    *version += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            versions
        }
    });
    eventually(Duration::from_secs(60), "events to flow", || async {
        recorder
            .0
            .lock()
            .unwrap()
            .values()
            .map(Vec::len)
            .sum::<usize>()
            > 50
    })
    .await;

    // The broker hangs with A's batch in flight; A's database session dies; B takes
    // over (a newer epoch) and publishes as soon as the broker is back, while A's
    // requests are still in the broker's buffers.
    broker.pause();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted
           AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)",
    )
    .bind(format!("thalo_kafka.relay.{}.outbox", db.schema))
    .fetch_all(&db.pool)
    .await
    .expect("terminate");
    assert_eq!(killed, vec![true], "A's session held the lock");
    eventually(Duration::from_secs(30), "relay B to lead", || async {
        b.status().active
    })
    .await;
    assert!(b.status().epoch > a.status().epoch, "B's epoch is newer");
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.resume();

    tokio::time::sleep(Duration::from_secs(2)).await;
    writing.store(false, Ordering::SeqCst);
    let versions = writer.await.expect("writer");
    eventually(
        Duration::from_secs(90),
        "every event to be handled",
        || async {
            let seen = recorder.0.lock().unwrap();
            (0..accounts).all(|a| {
                seen.get(&format!("acc-{a}"))
                    .and_then(|s| s.last().copied())
                    == Some(versions[a])
            })
        },
    )
    .await;
    let seen = recorder.0.lock().unwrap().clone();
    for a in 0..accounts {
        let sequences = &seen[&format!("acc-{a}")];
        assert!(
            sequences.windows(2).all(|w| w[1] > w[0]),
            "acc-{a} went backwards: {sequences:?}"
        );
        assert_eq!(
            *sequences,
            (1..=versions[a]).collect::<Vec<_>>(),
            "acc-{a}: every event once, in order"
        );
    }
    assert!(!a.status().active, "A publishes nothing more");

    stop.cancel();
    a_task.await.expect("relay A task").expect("relay A");
    b_task.await.expect("relay B task").expect("relay B");
    consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    db.drop_schema().await;
}
