//! The broker goes away while the relay is publishing, and comes back: nothing is lost,
//! nothing is reordered. Runs its own tansu broker (SQLite storage, random port).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message};
use thalo::{EventStore, Metadata};
use tokio_util::sync::CancellationToken;

async fn fill(db: &TestDb, aggregates: usize, from: u64, to: u64) {
    for a in 0..aggregates {
        let id = format!("acc-{a}");
        let mut version = from;
        while version < to {
            let n = 5.min(to - version);
            let events = (0..n)
                .map(|i| {
                    AccountEvent::Deposited(DepositedEvent {
                        amount: (version + i + 1) as i64,
                    })
                })
                .collect();
            db.store
                .append::<Account>(&id, version, events, &Metadata::default())
                .await
                .expect("append");
            version += n;
        }
    }
}

async fn read_all(
    brokers: &str,
    topic: &str,
    unique: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", random_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut messages = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let wait = if seen.len() < unique {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::from_secs(1)
        };
        if wait.is_zero() {
            break;
        }
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                let m = m.detach();
                seen.insert((m.key().map(<[u8]>::to_vec), header(&m, "thalo_sequence")));
                messages.push(m);
            }
            Ok(Err(_)) => {}
            Err(_) => break,
        }
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_survives_a_broker_restart() {
    require_kafka().await; // the shared broker is not used, but the suite needs it anyway
    let db = TestDb::new().await;
    let mut broker = OwnBroker::start().await;
    let (naming, topic) = naming();
    let aggregates = 10;

    let shutdown = CancellationToken::new();
    let relay = KafkaRelay::from_store(&db.store, broker.brokers())
        .with_topic_naming(naming.clone())
        .with_topic_settings(topic_settings())
        .with_poll_interval(Duration::from_millis(200))
        .with_batch_size(50)
        .with_retry(
            thalo_kafka::RetryPolicy::new(u32::MAX)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(1)),
        )
        .set("reconnect.backoff.max.ms", "500");
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });

    fill(&db, aggregates, 0, 20).await;
    eventually(
        Duration::from_secs(30),
        "the first events to be published",
        || async { db.outbox_len().await == 0 },
    )
    .await;

    // The broker dies; events keep being stored.
    broker.kill().await;
    fill(&db, aggregates, 20, 40).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        db.outbox_len().await > 0,
        "nothing can be published while the broker is down"
    );
    fill(&db, aggregates, 40, 60).await;

    // It comes back on the same port with the same data.
    broker.spawn().await;
    eventually(
        Duration::from_secs(90),
        "the outbox to drain after the restart",
        || async { db.outbox_len().await == 0 },
    )
    .await;

    let messages = read_all(
        &broker.brokers(),
        &topic,
        aggregates * 60,
        Duration::from_secs(60),
    )
    .await;
    let mut sorted: Vec<&OwnedMessage> = messages.iter().collect();
    sorted.sort_by_key(|m| (m.partition(), m.offset()));
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut duplicates = 0;
    for m in sorted {
        let key = String::from_utf8(m.key().expect("key").to_vec()).expect("key");
        let sequence: u64 = header(m, "thalo_sequence")
            .expect("sequence")
            .parse()
            .expect("number");
        let seen = last.entry(key.clone()).or_insert(0);
        if sequence <= *seen {
            duplicates += 1;
        } else {
            assert_eq!(sequence, *seen + 1, "{key}: {sequence} follows {seen}");
            *seen = sequence;
        }
    }
    assert_eq!(last.len(), aggregates);
    assert!(
        last.values().all(|s| *s == 60),
        "every event arrived: {last:?}"
    );
    eprintln!("duplicates after the restart: {duplicates}");

    shutdown.cancel();
    relay_task.await.expect("relay task").expect("relay");
    broker.kill().await;
    db.drop_schema().await;
}

use thalo_kafka::KafkaRelay;
