//! The `thalo-relay` binary (feature `cli`, off by default): it publishes a store's
//! outbox to Kafka and stops cleanly on SIGTERM.
//!
//! Built only with `--features cli` (`required-features` in Cargo.toml);
//! scripts/test.sh runs it so.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use thalo::{EventStore, Metadata};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_binary_publishes_the_outbox_and_stops_on_sigterm() {
    let brokers = require_kafka().await;
    let db = TestDb::new().await;
    let (_naming, topic) = naming();
    let prefix = topic.trim_end_matches("account").to_owned();

    let id = "acc-bin".to_owned();
    let events = (1..=5)
        .map(|amount| AccountEvent::Deposited(DepositedEvent { amount }))
        .collect();
    db.store
        .append::<Account>(&id, 0, events, &Metadata::default())
        .await
        .expect("append");

    let mut relay = Command::new(env!("CARGO_BIN_EXE_thalo-relay"))
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BROKERS", &brokers)
        .env("RUST_LOG", "warn")
        .args(["--schema", &db.schema])
        .args(["--topic-prefix", &prefix])
        .args(["--poll-interval-ms", "200"])
        .args(["--partitions", "3"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start thalo-relay");

    let messages = read_topic(&topic, 5, Duration::from_secs(60)).await;
    let sequences: Vec<String> = messages
        .iter()
        .filter_map(|m| header(m, "thalo_sequence"))
        .collect();
    assert_eq!(sequences, ["1", "2", "3", "4", "5"], "in order, once each");
    eventually(Duration::from_secs(10), "the outbox to drain", || async {
        db.outbox_len().await == 0
    })
    .await;

    // SIGTERM: the relay finishes the batch in hand and exits with status 0.
    let pid = relay.id().expect("the relay runs");
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(signalled.success());
    let status = tokio::time::timeout(Duration::from_secs(20), relay.wait())
        .await
        .expect("thalo-relay stops within 20 s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "thalo-relay exited with {status}");
    db.drop_schema().await;
}
