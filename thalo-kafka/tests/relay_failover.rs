//! Relays that crash, and relays that compete for one outbox.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use thalo::{EventStore, Metadata};
use tokio_util::sync::CancellationToken;

/// Appends `per_aggregate` deposits of 1..=n to each of `aggregates` accounts, ten at a
/// time, and returns the number of events.
async fn fill(db: &TestDb, aggregates: usize, per_aggregate: u64, start_version: u64) -> usize {
    for a in 0..aggregates {
        let id = format!("acc-{a}");
        let mut version = start_version;
        while version < start_version + per_aggregate {
            let n = 10.min(start_version + per_aggregate - version);
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
    aggregates * per_aggregate as usize
}

/// Per key, the sequences in offset order with duplicates (anything at or below the
/// highest sequence seen so far) dropped: what a checkpointing consumer applies. Panics
/// if a sequence is skipped.
fn applied_sequences(messages: &[OwnedMessage]) -> (HashMap<String, u64>, usize) {
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
            assert_eq!(
                sequence,
                *seen + 1,
                "{key}: sequence {sequence} came right after {seen}"
            );
            *seen = sequence;
        }
    }
    (last, duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_batch_loses_nothing() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();
    let aggregates = 30;
    let per_aggregate = 200;
    let total = fill(&db, aggregates, per_aggregate, 0).await;

    let shutdown = CancellationToken::new();
    let consumer = projection_consumer(&naming);
    let consumer_handle = consumer.handle();
    let consumer_task =
        tokio::spawn(consumer.run_projection(db.store.clone(), db.projection(), shutdown.clone()));

    // First relay: killed (task aborted, its session and producer dropped) while it is
    // in the middle of publishing.
    let first = db.relay(&naming).with_batch_size(250);
    let first_task = tokio::spawn({
        let (relay, shutdown) = (first.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    // Polled every millisecond (the status is in memory): at tens of thousands of
    // events a second, a 100 ms poll can find the outbox drained already.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while first.status().published < 500 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first relay never published"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first_task.abort();
    let _ = first_task.await;
    let left = db.outbox_len().await;
    assert!(
        left > 0,
        "the first relay was killed before the outbox was empty"
    );

    // Second relay: publishes the rest (and republishes whatever the first one had sent
    // but not deleted).
    let second = db.relay(&naming).with_batch_size(250);
    let second_task = tokio::spawn({
        let (relay, shutdown) = (second.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    eventually(Duration::from_secs(60), "the outbox to drain", || async {
        db.outbox_len().await == 0
    })
    .await;

    let messages = read_topic(&topic, total, Duration::from_secs(30)).await;
    // Give duplicates, if any, a moment to be read as well.
    let (applied, duplicates) = applied_sequences(&messages);
    assert_eq!(applied.len(), aggregates);
    for (key, last) in &applied {
        assert_eq!(*last, per_aggregate, "every event of {key} arrived");
    }

    // The projection is exact: duplicates were skipped.
    let expected_balance = (1..=per_aggregate as i64).sum::<i64>();
    db.wait_until_projected(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (key, (balance, events, last, out_of_order)) in db.balances().await {
        assert_eq!(
            (balance, events, last, out_of_order),
            (
                expected_balance,
                per_aggregate as i64,
                per_aggregate as i64,
                0
            ),
            "{key}"
        );
    }

    // Whether the kill above landed between an acknowledgement and the delete is down
    // to timing. Make sure it is covered: put back outbox rows of 300 events that were
    // published already, as a relay that crashed before deleting them would have left
    // them. They are published again and the projection skips them.
    let republish = 300;
    let skipped_before = consumer_handle.stats().duplicates;
    sqlx::query(&format!(
        "INSERT INTO {schema}.outbox (position) SELECT position FROM {schema}.events ORDER BY position LIMIT {republish}",
        schema = db.schema
    ))
    .execute(&db.pool)
    .await
    .expect("re-insert outbox rows");
    eventually(
        Duration::from_secs(30),
        "the duplicates to be published",
        || async { db.outbox_len().await == 0 },
    )
    .await;
    // They change nothing in the read model: the consumer's live count of skipped
    // duplicates shows that it received them.
    eventually(
        Duration::from_secs(30),
        "the consumer to skip the republished events",
        || async { consumer_handle.stats().duplicates >= skipped_before + republish },
    )
    .await;
    let before = db.balances().await;

    shutdown.cancel();
    second_task.await.expect("relay task").expect("relay");
    let stats = consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    assert_eq!(stats.handled, total as u64);
    assert!(stats.duplicates >= republish, "{stats:?}");
    assert_eq!(db.balances().await, before, "duplicates change nothing");
    eprintln!(
        "duplicates in Kafka: {duplicates}, skipped by the projection: {}",
        stats.duplicates
    );
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_relay_publishes_and_a_standby_takes_over() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();
    let shutdown = CancellationToken::new();

    let a = db.relay(&naming);
    let a_token = CancellationToken::new();
    let a_task = tokio::spawn({
        let (relay, token) = (a.clone(), a_token.clone());
        async move { relay.run(token).await }
    });
    eventually(
        Duration::from_secs(10),
        "relay A to take the lock",
        || async { a.status().active },
    )
    .await;

    let b = db.relay(&naming);
    let b_task = tokio::spawn({
        let (relay, shutdown) = (b.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });

    let first = fill(&db, 10, 10, 0).await;
    eventually(Duration::from_secs(30), "relay A to publish", || async {
        a.status().published == first as u64
    })
    .await;
    assert!(!b.status().active, "relay B stands by");
    assert_eq!(b.status().published, 0, "relay B published nothing");

    // A dies (task aborted: its session closes, which releases the lock).
    a_task.abort();
    let _ = a_task.await;
    eventually(Duration::from_secs(10), "relay B to take over", || async {
        b.status().active
    })
    .await;

    let second = fill(&db, 10, 10, 10).await;
    eventually(Duration::from_secs(30), "relay B to publish", || async {
        b.status().published == second as u64
    })
    .await;
    assert_eq!(a.status().published, first as u64);

    let messages = read_topic(&topic, first + second, Duration::from_secs(30)).await;
    let (applied, duplicates) = applied_sequences(&messages);
    assert_eq!(duplicates, 0);
    assert_eq!(applied.len(), 10);
    assert!(applied.values().all(|last| *last == 20));

    shutdown.cancel();
    b_task.await.expect("relay task").expect("relay");
    drop(a_token);
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_recovers_when_its_database_session_is_killed() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();
    let shutdown = CancellationToken::new();
    let relay = db.relay(&naming);
    let task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let first = fill(&db, 5, 10, 0).await;
    eventually(
        Duration::from_secs(30),
        "the first events to be published",
        || async { relay.status().published == first as u64 },
    )
    .await;

    // Kill the session that holds the relay's advisory lock, as a database restart or a
    // network failure would.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted
           AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)",
    )
    .bind(format!("thalo_kafka.relay.{}.outbox", db.schema))
    .fetch_all(&db.pool)
    .await
    .expect("terminate");
    assert_eq!(killed, vec![true], "the relay's session held the lock");

    let second = fill(&db, 5, 10, 10).await;
    eventually(
        Duration::from_secs(30),
        "the relay to reconnect and publish",
        || async {
            relay.status().published == (first + second) as u64 && db.outbox_len().await == 0
        },
    )
    .await;
    let messages = read_topic(&topic, first + second, Duration::from_secs(30)).await;
    let (applied, _) = applied_sequences(&messages);
    assert!(applied.values().all(|last| *last == 20), "{applied:?}");

    shutdown.cancel();
    task.await.expect("relay task").expect("relay");
    db.drop_schema().await;
}
