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

/// Records handled sequences; fails every time on a deposit of 13.
#[derive(Clone, Default)]
struct Picky(Arc<Mutex<Vec<u64>>>);

impl EventHandler<AccountEvent> for Picky {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        if let AccountEvent::Deposited(DepositedEvent { amount: 13 }) = envelope.event {
            return Err(Error::handler("picky", "13 is unlucky"));
        }
        self.0.lock().unwrap().push(envelope.sequence);
        Ok(())
    }
}

fn envelope(sequence: u64, event_type: &str, payload: &str) -> EventEnvelope<RawEvent> {
    EventEnvelope {
        id: Uuid::new_v4(),
        aggregate_type: "account".into(),
        aggregate_id: "acc-p".into(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_later_events_handled() {
    let brokers = require_kafka().await;
    init_tracing();
    let (naming, topic) = naming();
    let dlq = format!("{topic}.dlq");
    ensure_topics(&brokers, &[topic.clone(), dlq.clone()], &topic_settings())
        .await
        .expect("topics");

    // One key, so one partition and a fixed order.
    let producer = producer();
    let good = |sequence: u64, amount: i64| {
        envelope(sequence, "Deposited", &format!(r#"{{"amount":{amount}}}"#))
    };
    let messages = [
        ("good 1", good(1, 5)),
        ("malformed JSON", envelope(2, "Deposited", "{not json")),
        (
            "unknown event type",
            envelope(3, "Exploded", r#"{"amount":1}"#),
        ),
        ("good 4", good(4, 6)),
        ("handler keeps failing", good(5, 13)),
        ("good 6", good(6, 7)),
    ];
    for (_, e) in &messages {
        produce_raw(
            &producer,
            &topic,
            &e.aggregate_id,
            &e.event.payload,
            encode_headers(e),
        )
        .await;
    }
    // And one with no Thalo headers at all.
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
    let last = good(8, 8);
    produce_raw(
        &producer,
        &topic,
        "acc-p",
        &last.event.payload,
        encode_headers(&last),
    )
    .await;

    let handler = Picky::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer(&naming).run(handler.clone(), shutdown.clone()));

    eventually(
        Duration::from_secs(60),
        "the events after the poison to be handled",
        || async { handler.0.lock().unwrap().contains(&8) },
    )
    .await;
    assert_eq!(*handler.0.lock().unwrap(), vec![1, 4, 6, 8]);

    let dead = read_topic(&dlq, 4, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 4, "four dead letters");
    let mut dead: Vec<_> = dead.iter().collect();
    dead.sort_by_key(|m| {
        header(m, "thalo_dlq_offset")
            .unwrap()
            .parse::<i64>()
            .unwrap()
    });

    // Malformed JSON: the original key, value and headers, plus why.
    let m = dead[0];
    assert_eq!(m.key(), Some(&b"acc-p"[..]));
    assert_eq!(m.payload(), Some(&b"{not json"[..]));
    assert_eq!(header(m, "ce_type").as_deref(), Some("Deposited"));
    assert_eq!(header(m, "thalo_sequence").as_deref(), Some("2"));
    assert_eq!(header(m, "thalo_dlq_reason").as_deref(), Some("decode"));
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
    let m = dead[1];
    assert_eq!(header(m, "ce_type").as_deref(), Some("Exploded"));
    assert_eq!(header(m, "thalo_dlq_reason").as_deref(), Some("decode"));
    let error = header(m, "thalo_dlq_error").unwrap();
    assert!(error.contains("unknown event type `Exploded`"), "{error}");

    // The handler failed on every attempt (3).
    let m = dead[2];
    assert_eq!(m.payload(), Some(&br#"{"amount":13}"#[..]));
    assert_eq!(header(m, "thalo_dlq_reason").as_deref(), Some("handler"));
    assert_eq!(header(m, "thalo_dlq_attempts").as_deref(), Some("3"));
    let error = header(m, "thalo_dlq_error").unwrap();
    assert!(error.contains("13 is unlucky"), "{error}");

    // No Thalo headers.
    let m = dead[3];
    assert_eq!(header(m, "origin").as_deref(), Some("someone else"));
    assert_eq!(header(m, "thalo_dlq_reason").as_deref(), Some("decode"));
    let error = header(m, "thalo_dlq_error").unwrap();
    assert!(error.contains("header `ce_id` is missing"), "{error}");

    shutdown.cancel();
    let stats = task.await.expect("consumer task").expect("consumer");
    assert_eq!((stats.handled, stats.dead_lettered), (4, 4));
    assert_eq!(stats.retries, 2);
}
