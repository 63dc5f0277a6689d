//! Read-your-writes on the Kafka path: commands -> store -> relay -> Kafka -> consumer
//! -> Postgres projection, and `PgEventStore::wait_until_projected` returning once the
//! read model shows a command; the consumer's progress while it runs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use thalo::{Repository, Shutdown};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_in_the_kafka_fed_read_model_once_the_wait_returns() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();
    let repo = Repository::new(db.store.clone());

    let shutdown = Shutdown::new();
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (db.relay(&naming), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let consumer = projection_consumer(&naming);
    let handle = consumer.handle();
    let consumer_task =
        tokio::spawn(consumer.run_projection(db.store.clone(), db.projection(), shutdown.clone()));

    let mut events = 0;
    for i in 1..=12_i64 {
        let id = format!("acc-{}", i % 3);
        let stored = repo
            .execute::<Account>(&id, AccountCommand::Deposit { amount: i })
            .await
            .expect("deposit");
        events += stored.len() as u64;
        db.store
            .wait_until_projected(&db.projection(), &stored, Duration::from_secs(60))
            .await
            .expect("the deposit reaches the read model");
        // No polling: the row is there now.
        let (balance, _, last, out_of_order) = db.balances().await[&id];
        let expected: i64 = (1..=i).filter(|n| n % 3 == i % 3).sum();
        assert_eq!(
            (balance, last, out_of_order),
            (expected, (i + 2) / 3, 0),
            "{id}"
        );
    }

    // The consumer's progress, while it runs: what it handled, and (from the
    // statistics, refreshed every second) where it is in its partitions.
    assert!(handle.is_running());
    assert_eq!(handle.stats().handled, events);
    let deadline = Instant::now() + Duration::from_secs(20);
    let position = |handle: &thalo_kafka::ConsumerHandle| -> i64 {
        handle.partitions().iter().map(|p| p.position).sum()
    };
    // Statistics taken before the last messages arrived say "caught up" too: wait for
    // ones that include every event.
    while handle.lag() != Some(0) || position(&handle) < events as i64 {
        assert!(
            Instant::now() < deadline,
            "the consumer's statistics never showed it caught up: {:?}",
            handle.partitions()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let partitions = handle.partitions();
    assert_eq!(partitions.len(), 3, "{partitions:?}");
    assert!(partitions.iter().all(|p| p.topic == topic && p.lag() == 0));
    let high: i64 = partitions.iter().map(|p| p.high_watermark).sum();
    assert_eq!(high, events as i64, "{partitions:?}");

    shutdown.trigger();
    relay_task.await.expect("relay task").expect("relay");
    let stats = consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    assert_eq!(stats.handled, events);
    assert_eq!(
        handle.stats(),
        stats,
        "the handle keeps the last run's totals"
    );
    assert!(handle.partitions().is_empty());
    db.drop_schema().await;
}
