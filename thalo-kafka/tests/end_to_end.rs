//! Commands -> PgEventStore -> outbox -> relay -> Kafka -> consumer -> Postgres projection.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use thalo::{EventStore, Metadata, Repository};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_matches_the_aggregates() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, _topic) = naming();
    let repo = Repository::new(db.store.clone());

    let shutdown = CancellationToken::new();
    let relay = db.relay(&naming);
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });
    let consumer_task = tokio::spawn(projection_consumer(&naming).run_projection(
        db.store.clone(),
        db.projection(),
        shutdown.clone(),
    ));

    // 20 accounts, a mix of deposits and withdrawals, some rejected by invariants.
    let accounts: Vec<String> = (0..20).map(|i| format!("acc-{i}")).collect();
    let mut stored = Vec::new();
    for round in 0..10_i64 {
        for (i, id) in accounts.iter().enumerate() {
            let amount = (i as i64 + 1) * 10 + round;
            stored.extend(
                repo.execute::<Account>(id, AccountCommand::Deposit { amount })
                    .await
                    .expect("deposit"),
            );
            if round % 3 == 2 {
                if let Ok(withdrawn) = repo
                    .execute::<Account>(id, AccountCommand::Withdraw { amount: amount * 2 })
                    .await
                {
                    stored.extend(withdrawn);
                }
            }
        }
    }

    let mut expected = HashMap::new();
    for id in &accounts {
        let loaded = repo.load::<Account>(id).await.expect("load");
        expected.insert(
            id.clone(),
            (loaded.aggregate.balance, loaded.version as i64),
        );
    }
    let total_events: i64 = expected.values().map(|(_, v)| v).sum();
    assert_eq!(stored.len() as i64, total_events);

    // Read-your-writes through the whole pipeline: the events the commands stored.
    db.store
        .wait_until_projected(&db.projection(), &stored, Duration::from_secs(60))
        .await
        .expect("the projection applies every stored event");

    let balances = db.balances().await;
    for (id, (balance, version)) in &expected {
        let (b, events, last, out_of_order) = balances[id];
        assert_eq!(
            (b, events, last, out_of_order),
            (*balance, *version, *version, 0),
            "account {id}"
        );
    }
    assert_eq!(balances.len(), accounts.len());

    // Everything was published and deleted from the outbox.
    eventually(Duration::from_secs(10), "the outbox to drain", || async {
        db.outbox_len().await == 0
    })
    .await;
    let lag = relay.lag().await.expect("lag");
    assert_eq!((lag.pending, lag.oldest_age), (0, None));
    let status = relay.status();
    assert!(status.active);
    assert_eq!(status.published, total_events as u64);

    shutdown.cancel();
    relay_task.await.expect("relay task").expect("relay");
    let stats = consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    assert_eq!(stats.handled, total_events as u64);
    assert_eq!(stats.dead_lettered, 0);
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_carry_cloudevents_and_thalo_headers() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();

    let correlation = Uuid::new_v4();
    let causation = Uuid::new_v4();
    let metadata = Metadata::new()
        .with_correlation_id(correlation)
        .with_causation_id(causation)
        .with_header("user", "alice");
    let stored = db
        .store
        .append::<Account>(
            &"acc-h".to_string(),
            0,
            vec![AccountEvent::Deposited(DepositedEvent { amount: 42 })],
            &metadata,
        )
        .await
        .expect("append");
    let event = &stored[0];

    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (db.relay(&naming), shutdown.clone());
        async move { relay.run(shutdown).await }
    });

    let messages = read_topic(&topic, 1, Duration::from_secs(30)).await;
    assert_eq!(messages.len(), 1, "the event reaches Kafka");
    let m = &messages[0];
    use rdkafka::Message;
    assert_eq!(m.key(), Some(&b"acc-h"[..]));
    let value: serde_json::Value =
        serde_json::from_slice(m.payload().expect("value")).expect("JSON value");
    assert_eq!(value, serde_json::json!({ "amount": 42 }));
    let expect = [
        ("ce_specversion", "1.0".to_owned()),
        ("ce_id", event.id.to_string()),
        ("ce_type", "Deposited".to_owned()),
        ("ce_source", "thalo/account".to_owned()),
        ("ce_subject", "acc-h".to_owned()),
        ("content-type", "application/json".to_owned()),
        ("thalo_aggregate_type", "account".to_owned()),
        ("thalo_aggregate_id", "acc-h".to_owned()),
        ("thalo_sequence", "1".to_owned()),
        ("thalo_position", event.position.to_string()),
        ("thalo_event_version", "1".to_owned()),
        ("thalo_correlation_id", correlation.to_string()),
        ("thalo_causation_id", causation.to_string()),
        ("thalo_meta_user", "alice".to_owned()),
    ];
    for (key, value) in expect {
        assert_eq!(
            header(m, key).as_deref(),
            Some(value.as_str()),
            "header {key}"
        );
    }
    let time = header(m, "ce_time").expect("ce_time");
    let parsed = chrono::DateTime::parse_from_rfc3339(&time).expect("RFC 3339");
    assert_eq!(parsed.with_timezone(&chrono::Utc), event.timestamp);

    // And the library reads it back into the same envelope.
    let decoded = thalo_kafka::decode_message::<AccountEvent, _>(m).expect("decode");
    assert_eq!(decoded, *event);

    shutdown.cancel();
    relay_task.await.expect("relay task").expect("relay");
    db.drop_schema().await;
}
