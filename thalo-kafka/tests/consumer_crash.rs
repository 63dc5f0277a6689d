//! A projection consumer that crashes after handling messages but before committing
//! their offsets gets them again, and the projection stays exact.

mod common;

use std::time::Duration;

use common::*;
use thalo::{EventStore, Metadata};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_is_exact_after_a_crash_before_offsets_are_committed() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, _topic) = naming();
    let accounts = 20;
    let per_account = 40_u64;
    for a in 0..accounts {
        let id = format!("acc-{a}");
        for v in (0..per_account).step_by(5) {
            let events = (v..v + 5)
                .map(|i| {
                    AccountEvent::Deposited(DepositedEvent {
                        amount: i as i64 + 1,
                    })
                })
                .collect();
            db.store
                .append::<Account>(&id, v, events, &Metadata::default())
                .await
                .expect("append");
        }
    }
    let total = accounts * per_account as usize;

    // Publish everything first.
    let relay_stop = CancellationToken::new();
    let relay_task = tokio::spawn({
        let (relay, stop) = (db.relay(&naming), relay_stop.clone());
        async move { relay.run(stop).await }
    });
    eventually(Duration::from_secs(60), "the outbox to drain", || async {
        db.outbox_len().await == 0
    })
    .await;
    relay_stop.cancel();
    relay_task.await.expect("relay task").expect("relay");

    // One group for the three consumers: the same prefix and projection.
    let prefix = random_name("balances");
    let projection_consumer = |commit_interval: Duration| {
        projection_consumer_with_prefix(&naming, &prefix)
            .with_commit_interval(commit_interval)
            .with_batch_size(10)
    };

    // Consumer 1 never commits on its own (commit interval of an hour) and crashes
    // (its task is aborted) halfway: it handled about half of the events, and Kafka
    // knows nothing about it.
    let never = CancellationToken::new();
    let first_consumer = projection_consumer(Duration::from_secs(3600));
    // Its live counts (events applied, each batch counted once committed): where
    // "halfway" is, which no set of events known in advance tells.
    let first_handle = first_consumer.handle();
    let first = tokio::spawn(first_consumer.run_projection(
        db.store.clone(),
        db.projection(),
        never.clone(),
    ));
    eventually(
        Duration::from_secs(60),
        "consumer 1 to handle half",
        || async { first_handle.stats().handled >= total as u64 / 2 },
    )
    .await;
    first.abort();
    let _ = first.await;
    let after_crash: i64 = db.balances().await.values().map(|r| r.1).sum();
    assert!(after_crash >= total as i64 / 2);

    // Consumer 2, same group: everything is delivered again from the start. What
    // consumer 1 applied is skipped; the rest is applied once.
    let stop = CancellationToken::new();
    let second = tokio::spawn(
        projection_consumer(Duration::from_millis(200)).run_projection(
            db.store.clone(),
            db.projection(),
            stop.clone(),
        ),
    );
    // Its checkpoints show every stored event: the read model is complete.
    db.wait_until_projected(Duration::from_secs(60)).await;
    // Let any straggling redelivery arrive, then stop gracefully (commits offsets).
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let stats = second.await.expect("consumer task").expect("consumer");
    assert_eq!(stats.handled + stats.duplicates, total as u64, "{stats:?}");
    assert!(
        stats.duplicates >= after_crash as u64,
        "{stats:?}: redelivered events were skipped"
    );
    assert_eq!(stats.handled, total as u64 - stats.duplicates);

    let expected_balance = (1..=per_account as i64).sum::<i64>();
    let balances = db.balances().await;
    assert_eq!(balances.len(), accounts);
    for (key, row) in balances {
        assert_eq!(
            row,
            (expected_balance, per_account as i64, per_account as i64, 0),
            "{key}"
        );
    }

    // Consumer 3, same group, after the graceful shutdown: the offsets were committed,
    // so there is nothing to redo.
    let stop = CancellationToken::new();
    let third = tokio::spawn(
        projection_consumer(Duration::from_millis(200)).run_projection(
            db.store.clone(),
            db.projection(),
            stop.clone(),
        ),
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.cancel();
    let stats = third.await.expect("consumer task").expect("consumer");
    assert_eq!((stats.handled, stats.duplicates), (0, 0), "{stats:?}");
    db.drop_schema().await;
}
