//! Poison messages go to the dead-letter topic; the consumer goes on.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use common::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::Message;
use thalo::{Error, EventEnvelope, EventHandler, Metadata, RawEvent};
use thalo_kafka::{encode_headers, ensure_topics};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Records handled (aggregate, sequence); fails every time on a deposit of 13.
#[derive(Clone, Default)]
struct Picky(Arc<Mutex<Vec<(String, u64)>>>);

impl EventHandler<AccountEvent> for Picky {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        if let AccountEvent::Deposited(DepositedEvent { amount: 13 }) = envelope.event {
            return Err(Error::handler("picky", "13 is unlucky"));
        }
        self.0
            .lock()
            .unwrap()
            .push((envelope.aggregate_id.clone(), envelope.sequence));
        Ok(())
    }
}

fn envelope(id: &str, sequence: u64, event_type: &str, payload: &str) -> EventEnvelope<RawEvent> {
    EventEnvelope {
        id: Uuid::new_v4(),
        aggregate_type: "account".into(),
        aggregate_id: id.into(),
        sequence,
        position: sequence,
        timestamp: Utc::now(),
        metadata: Metadata::default(),
        event: RawEvent {
            event_type: event_type.into(),
            version: 1,
            payload: payload.into(),
        },
    }
}

/// Poison messages park their aggregate (sequenced dead letters): the aggregate's later
/// events are held, not handled past the hole, while other aggregates go on; every
/// message not handled is in the dead-letter topic with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_park_their_aggregate_and_other_aggregates_go_on() {
    let brokers = require_kafka().await;
    init_tracing();
    let (naming, topic) = naming();
    let dlq = format!("{topic}.dlq");
    // One partition, so the messages of all aggregates keep one order.
    let one_partition = topic_settings().with_partitions(1);
    ensure_topics(&brokers, &[topic.clone(), dlq.clone()], &one_partition)
        .await
        .expect("topics");

    let producer = producer();
    let deposit = |id: &str, sequence: u64, amount: i64| {
        envelope(
            id,
            sequence,
            "Deposited",
            &format!(r#"{{"amount":{amount}}}"#),
        )
    };
    let messages = [
        deposit("acc-good", 1, 5),
        envelope("acc-json", 1, "Deposited", "{not json"),
        envelope("acc-type", 1, "Exploded", r#"{"amount":1}"#),
        deposit("acc-good", 2, 6),
        deposit("acc-fail", 1, 13),
        deposit("acc-json", 2, 7),
    ];
    for e in &messages {
        produce_raw(
            &producer,
            &topic,
            &e.aggregate_id,
            &e.event.payload,
            encode_headers(e),
        )
        .await;
    }
    // One with no Thalo headers at all: no aggregate to park.
    produce_raw(
        &producer,
        &topic,
        "acc-p",
        r#"{"amount":1}"#,
        OwnedHeaders::new().insert(Header {
            key: "origin",
            value: Some("someone else"),
        }),
    )
    .await;
    for e in [deposit("acc-good", 3, 8), deposit("acc-fail", 2, 9)] {
        produce_raw(
            &producer,
            &topic,
            &e.aggregate_id,
            &e.event.payload,
            encode_headers(&e),
        )
        .await;
    }

    let handler = Picky::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        consumer(&naming)
            .with_topic_settings(one_partition)
            .run(handler.clone(), shutdown.clone()),
    );

    let dead = read_topic(&dlq, 6, Duration::from_secs(60)).await;
    assert_eq!(dead.len(), 6, "six dead letters");
    let mut dead: Vec<_> = dead.iter().collect();
    dead.sort_by_key(|m| {
        header(m, "thalo_dlq_offset")
            .unwrap()
            .parse::<i64>()
            .unwrap()
    });
    eventually(
        Duration::from_secs(30),
        "acc-good to be handled",
        || async { handler.0.lock().unwrap().len() == 3 },
    )
    .await;
    assert_eq!(
        *handler.0.lock().unwrap(),
        vec![
            ("acc-good".to_owned(), 1),
            ("acc-good".to_owned(), 2),
            ("acc-good".to_owned(), 3)
        ],
        "only the aggregate without poison is handled"
    );

    let summary: Vec<(Option<String>, Option<String>, Option<String>)> = dead
        .iter()
        .map(|m| {
            (
                header(m, "thalo_aggregate_id"),
                header(m, "thalo_sequence"),
                header(m, "thalo_dlq_reason"),
            )
        })
        .collect();
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        summary,
        vec![
            (some("acc-json"), some("1"), some("decode")),
            (some("acc-type"), some("1"), some("decode")),
            (some("acc-fail"), some("1"), some("handler")),
            (some("acc-json"), some("2"), some("held")),
            (None, None, some("decode")),
            (some("acc-fail"), some("2"), some("held")),
        ],
        "{summary:?}"
    );

    // Malformed JSON: the original key, value and headers, plus why.
    let m = dead[0];
    assert_eq!(m.key(), Some(&b"acc-json"[..]));
    assert_eq!(m.payload(), Some(&b"{not json"[..]));
    assert_eq!(header(m, "ce_type").as_deref(), Some("Deposited"));
    assert_eq!(
        header(m, "thalo_dlq_topic").as_deref(),
        Some(topic.as_str())
    );
    assert_eq!(header(m, "thalo_dlq_attempts").as_deref(), Some("0"));
    let error = header(m, "thalo_dlq_error").unwrap();
    assert!(
        error.contains("could not (de)serialize Deposited"),
        "{error}"
    );

    // Unknown event type.
    let error = header(dead[1], "thalo_dlq_error").unwrap();
    assert!(error.contains("unknown event type `Exploded`"), "{error}");

    // The handler failed on every attempt (3).
    let m = dead[2];
    assert_eq!(m.payload(), Some(&br#"{"amount":13}"#[..]));
    assert_eq!(header(m, "thalo_dlq_attempts").as_deref(), Some("3"));
    let error = header(m, "thalo_dlq_error").unwrap();
    assert!(error.contains("13 is unlucky"), "{error}");

    // Held: names the event it waits behind.
    let error = header(dead[3], "thalo_dlq_error").unwrap();
    assert!(
        error.contains("event 1 of account `acc-json` is parked"),
        "{error}"
    );

    // No Thalo headers.
    let m = dead[4];
    assert_eq!(header(m, "origin").as_deref(), Some("someone else"));
    let error = header(m, "thalo_dlq_error").unwrap();
    assert!(error.contains("header `ce_id` is missing"), "{error}");

    shutdown.cancel();
    let stats = task.await.expect("consumer task").expect("consumer");
    assert_eq!((stats.handled, stats.dead_lettered), (3, 4));
    assert_eq!((stats.parked, stats.held), (3, 2));
    assert_eq!(stats.retries, 2);
}
