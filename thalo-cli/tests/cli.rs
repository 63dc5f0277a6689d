//! The `thalo` binary against a real Postgres (and a real broker for the Kafka
//! commands): each test makes its own schema, topics and groups, runs the binary, and
//! checks both what it prints (tables and `--json`) and what it changed.

mod common;

use std::time::Duration;

use common::{entry, random_name, Noop, TestDb, ACCOUNT};
use serde_json::{json, Value};
use thalo::{CheckpointStore, EventStore};
use thalo_kafka::rdkafka::Offset;

/// The element of the JSON array `items` whose `key` is `value`.
fn find<'a>(items: &'a Value, key: &str, value: &str) -> &'a Value {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {items}"))
        .iter()
        .find(|item| item[key] == value)
        .unwrap_or_else(|| panic!("no {key} = {value} in {items}"))
}

/// A store with a parked aggregate (`a`, refused at its event 1, its 3 events waiting)
/// and `b`'s 2 events published; a store-fed reader `store_view` at `b`'s event 1, two
/// events behind... see the assertions. Returns the ids and the positions in order.
struct Scene {
    db: TestDb,
    a: String,
    b: String,
    /// a1 a2 a3 b1 b2.
    positions: Vec<u64>,
}

async fn scene() -> Scene {
    let db = TestDb::new().await;
    let (a, b) = (random_name("a"), random_name("b"));
    let mut positions: Vec<u64> = db
        .deposit(&a, 0, 3)
        .await
        .iter()
        .map(|e| e.position)
        .collect();
    let b_events = db.deposit(&b, 0, 2).await;
    positions.extend(b_events.iter().map(|e| e.position));
    Scene {
        db,
        a,
        b,
        positions,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_parked_aggregates_and_streams_and_every_projections_lag() {
    let Scene {
        db,
        a,
        b,
        positions,
    } = scene().await;
    let head = positions[4];

    // The relay published b's events; the broker refused a's first one for good.
    let outbox = db.store.outbox();
    let mut leader = outbox.try_claim("relay-test").await.unwrap().expect("free");
    let all = leader.fetch(100, &[]).await.unwrap();
    let published: Vec<i64> = all
        .iter()
        .filter(|e| e.envelope.aggregate_id == b)
        .map(|e| e.id)
        .collect();
    assert_eq!(leader.acknowledge(&published).await.unwrap(), 2);
    leader
        .park(entry(&all, &a, 1), "MessageSizeTooLarge: 2 MB > 1 MB")
        .await
        .unwrap();

    // A store-fed reader at a's last event: b1 and b2 are behind.
    db.store
        .save_checkpoint("store_view", positions[2])
        .await
        .unwrap();
    // A Kafka-fed projection: a applied up to 2 (1 behind), b parked at 2 (1 behind).
    let balances = Noop {
        name: "balances".into(),
    };
    let a_events = db
        .store
        .read_stream::<common::Account>(&a, 0)
        .await
        .unwrap();
    db.store
        .apply_exactly_once(&balances, &a_events[..2])
        .await
        .unwrap();
    db.store
        .park_stream("balances", ACCOUNT, &b, 2, "handler failed: boom")
        .await
        .unwrap();

    let status = db.thalo(&["status", "--json"]).json();
    assert_eq!(status["head_position"], head);
    assert_eq!(status["outbox"]["pending"], 3);
    assert_eq!(status["outbox"]["parked_aggregates"], 1);
    assert!(status["outbox"]["oldest_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(status["relay"]["leader"]["holder"], "relay-test");
    assert_eq!(status["relay"]["leader"]["epoch"], leader.epoch());
    assert_eq!(status["relay"]["lock_held"], true);

    let parked = &status["parked"]["relay"];
    assert_eq!(parked.as_array().unwrap().len(), 1);
    assert_eq!(parked[0]["aggregate_type"], ACCOUNT);
    assert_eq!(parked[0]["aggregate_id"], a.as_str());
    assert_eq!(parked[0]["sequence"], 1);
    assert_eq!(parked[0]["position"], positions[0]);
    assert_eq!(parked[0]["waiting"], 3);
    assert_eq!(parked[0]["error"], "MessageSizeTooLarge: 2 MB > 1 MB");
    let streams = &status["parked"]["consumers"];
    assert_eq!(streams.as_array().unwrap().len(), 1);
    assert_eq!(streams[0]["consumer"], "balances");
    assert_eq!(streams[0]["aggregate_id"], b.as_str());
    assert_eq!(streams[0]["sequence"], 2);

    let projections = &status["projections"];
    assert_eq!(projections.as_array().unwrap().len(), 2);
    let store_view = find(projections, "name", "store_view");
    assert_eq!(store_view["kind"], "store-fed");
    assert_eq!(store_view["position"], positions[2]);
    assert_eq!(store_view["behind"], 2);
    assert!(store_view["oldest_unapplied_age_seconds"]
        .as_f64()
        .is_some());
    let kafka_fed = find(projections, "name", "balances");
    assert_eq!(kafka_fed["kind"], "kafka-fed");
    assert_eq!(kafka_fed["streams"], 2);
    assert_eq!(kafka_fed["behind"], 2);
    assert_eq!(kafka_fed["parked_streams"], 1);
    assert!(kafka_fed["oldest_unapplied_age_seconds"].as_f64().is_some());
    assert_eq!(status["kafka"]["state"], "not_configured");

    // The same as tables.
    let run = db.thalo(&["status"]);
    let text = run.ok();
    for expected in [
        format!("head position {head}"),
        "Outbox: 3 pending".to_owned(),
        "1 parked aggregate\n".to_owned(),
        format!("leader `relay-test`, epoch {}", leader.epoch()),
        "lock held".to_owned(),
        "Parked aggregates (relay)".to_owned(),
        a.clone(),
        "MessageSizeTooLarge".to_owned(),
        "Parked streams (consumers)".to_owned(),
        b.clone(),
        "handler failed: boom".to_owned(),
        "store_view".to_owned(),
        format!("position {}", positions[2]),
        "store-fed".to_owned(),
        "kafka-fed".to_owned(),
        "2 streams".to_owned(),
        "Kafka: not configured".to_owned(),
    ] {
        assert!(text.contains(&expected), "no `{expected}` in:\n{text}");
    }

    // The leader's row outlives it; the lock says whether a relay is running.
    leader.release().await.unwrap();
    let status = db.thalo(&["status", "--json"]).json();
    assert_eq!(status["relay"]["lock_held"], false);
    assert_eq!(status["relay"]["leader"]["holder"], "relay-test");
    assert!(db.thalo(&["status"]).ok().contains("no relay is running"));

    // The store-fed reader catches up: nothing behind, no age.
    db.store.save_checkpoint("store_view", head).await.unwrap();
    let status = db.thalo(&["status", "--json"]).json();
    let store_view = find(&status["projections"], "name", "store_view");
    assert_eq!(store_view["behind"], 0);
    assert_eq!(store_view["oldest_unapplied_age_seconds"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_says_kafka_is_unreachable_and_fails_only_when_strict() {
    let db = TestDb::new().await;
    db.deposit(&random_name("a"), 0, 1).await;
    let args = [
        "status",
        "--brokers",
        "127.0.0.1:1",
        "--kafka-timeout-ms",
        "500",
    ];

    let status = db.thalo(&[&args[..], &["--json"]].concat()).json();
    assert_eq!(status["kafka"]["state"], "unreachable");
    assert_eq!(status["kafka"]["brokers"], "127.0.0.1:1");
    assert!(status["kafka"]["error"]
        .as_str()
        .unwrap()
        .contains("cannot reach the Kafka cluster"));
    assert_eq!(status["outbox"]["pending"], 1, "the Postgres part is there");

    let text = db.thalo(&args).ok().to_owned();
    assert!(text.contains("Kafka: unreachable at 127.0.0.1:1"), "{text}");
    assert!(text.contains("Outbox: 1 pending"), "{text}");

    let strict = db.thalo(&[&args[..], &["--strict"]].concat());
    let error = strict.fails(1);
    assert!(error.starts_with("error: Kafka is unreachable"), "{error}");
    assert_eq!(error.lines().count(), 1, "one line: {error}");
    assert!(
        strict.stdout.contains("Outbox: 1 pending"),
        "everything else is printed first: {}",
        strict.stdout
    );

    // --no-kafka leaves it out.
    let status = db
        .thalo(&[&args[..], &["--no-kafka", "--json"]].concat())
        .json();
    assert_eq!(status["kafka"]["state"], "skipped");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_consumer_group_lag_per_partition() {
    let brokers = common::require_kafka().await;
    let db = TestDb::new().await;
    let a = random_name("a");
    let events = db.deposit(&a, 0, 2).await;
    let prefix = format!("{}.", random_name("t"));
    let topic = format!("{prefix}{ACCOUNT}");
    common::create_topic(&topic, 1).await;
    let producer = common::producer();
    for n in 0..5 {
        common::produce(&producer, &topic, &a, &format!("{{\"n\":{n}}}"), &[]).await;
    }

    // A Kafka-fed projection whose name is its group: it committed offset 2 of 5.
    let group = random_name("balances");
    let projection = Noop {
        name: group.clone(),
    };
    db.store
        .apply_exactly_once(&projection, &events[..1])
        .await
        .unwrap();
    common::commit(&group, &topic, 2);
    // A group with no commits at all: the aggregate topics stand in, wholly unread.
    let idle = random_name("idle");

    let run = db.thalo(&[
        "status",
        "--brokers",
        &brokers,
        "--topic-prefix",
        &prefix,
        "--json",
    ]);
    let status = run.json();
    assert_eq!(status["kafka"]["state"], "ok", "{status}");
    let groups = &status["kafka"]["groups"];
    let lag = find(groups, "group", &group);
    assert_eq!(
        lag["partitions"],
        json!([{
            "topic": topic,
            "partition": 0,
            "committed": 2,
            "low_watermark": 0,
            "high_watermark": 5,
            "lag": 3,
        }])
    );
    assert_eq!(lag["lag"], 3);
    assert_eq!(
        groups.as_array().unwrap().len(),
        1,
        "only the Kafka-fed projection"
    );

    let status = db
        .thalo(&[
            "status",
            "--brokers",
            &brokers,
            "--topic-prefix",
            &prefix,
            "--group",
            &idle,
            "--group",
            &group,
            "--json",
        ])
        .json();
    let groups = &status["kafka"]["groups"];
    let unread = find(groups, "group", &idle);
    assert_eq!(unread["note"], "no committed offsets");
    assert_eq!(unread["partitions"][0]["topic"], topic.as_str());
    assert_eq!(unread["partitions"][0]["committed"], Value::Null);
    assert_eq!(unread["partitions"][0]["lag"], 5);
    assert_eq!(find(groups, "group", &group)["lag"], 3);

    let text = db
        .thalo(&["status", "--brokers", &brokers, "--topic-prefix", &prefix])
        .ok()
        .to_owned();
    assert!(text.contains("Kafka consumer groups"), "{text}");
    assert!(text.contains(&group) && text.contains(&topic), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_list_retry_and_skip() {
    let Scene {
        db,
        a,
        b,
        positions,
        ..
    } = scene().await;
    let outbox = db.store.outbox();
    let mut leader = outbox.try_claim("relay-test").await.unwrap().expect("free");
    let all = leader.fetch(100, &[]).await.unwrap();
    leader
        .park(entry(&all, &a, 1), "refused: too large")
        .await
        .unwrap();
    db.store
        .park_stream("balances", ACCOUNT, &b, 2, "handler failed")
        .await
        .unwrap();

    let list = db.thalo(&["parked", "list", "--json"]).json();
    assert_eq!(list["relay"].as_array().unwrap().len(), 1);
    assert_eq!(list["relay"][0]["aggregate_id"], a.as_str());
    assert_eq!(list["relay"][0]["error"], "refused: too large");
    assert_eq!(list["consumers"].as_array().unwrap().len(), 1);
    assert_eq!(list["consumers"][0]["consumer"], "balances");
    assert_eq!(list["consumers"][0]["sequence"], 2);
    let text = db.thalo(&["parked", "list"]).ok().to_owned();
    assert!(
        text.contains("Parked aggregates (relay)") && text.contains(&a),
        "{text}"
    );
    assert!(
        text.contains("Parked streams (consumers)") && text.contains(&b),
        "{text}"
    );

    // Retry releases the aggregate, recorded.
    let retried = db.thalo(&["parked", "retry", ACCOUNT, &a, "--json"]).json();
    assert_eq!(retried["action"], "retried");
    assert_eq!(retried["consumer"], Value::Null);
    assert_eq!(db.count("outbox_parked", "true").await, 0);
    assert_eq!(
        db.count("outbox", "true").await,
        5,
        "nothing leaves the outbox"
    );
    let log = db.parking_log().await;
    assert_eq!(log.last().unwrap().2, "retried");
    db.thalo(&["parked", "retry", ACCOUNT, &a])
        .fails(1)
        .contains("is not parked")
        .then_some(())
        .expect("not parked any more");

    // Parked again; a skip needs a reason, then drops the refused event from the outbox.
    leader
        .park(entry(&all, &a, 1), "refused again")
        .await
        .unwrap();
    let usage = db.thalo(&["parked", "skip", ACCOUNT, &a]);
    assert_eq!(usage.code, Some(2), "{usage:?}");
    assert!(usage.stderr.contains("--reason"), "{usage:?}");
    let skipped = db
        .thalo(&[
            "parked",
            "skip",
            ACCOUNT,
            &a,
            "--reason",
            "poison, INC-42",
            "--json",
        ])
        .json();
    assert_eq!(skipped["action"], "skipped");
    assert_eq!(skipped["sequence"], 1);
    assert_eq!(skipped["position"], positions[0]);
    assert_eq!(db.count("outbox_parked", "true").await, 0);
    assert_eq!(
        db.count("outbox", &format!("position = {}", positions[0]))
            .await,
        0
    );
    assert_eq!(db.count("outbox", "true").await, 4);
    let last = db.parking_log().await.pop().unwrap();
    assert_eq!(
        (last.2.as_str(), last.4.as_str()),
        ("skipped", "poison, INC-42")
    );
    let error = db
        .thalo(&["parked", "skip", ACCOUNT, &a, "--reason", "again"])
        .fails(1)
        .to_owned();
    assert!(
        error.contains(&format!("{ACCOUNT} `{a}` (relay) is not parked")),
        "{error}"
    );

    // A consumer's parked stream: skip its first parked event; the stream stays parked.
    let text = db
        .thalo(&[
            "parked",
            "skip",
            ACCOUNT,
            &b,
            "--consumer",
            "balances",
            "--reason",
            "bad data",
        ])
        .ok()
        .to_owned();
    assert!(text.contains("skipped event 2"), "{text}");
    let stream: (i64, bool) = sqlx::query_as(&format!(
        "SELECT sequence, parked FROM {} WHERE projection = 'balances' AND aggregate_id = $1",
        db.table("stream_checkpoints")
    ))
    .bind(&b)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        stream,
        (2, true),
        "checkpoint past the skipped event, still parked"
    );
    let parked = db
        .store
        .parked_stream("balances", ACCOUNT, &b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parked.sequence, 3);
    let last = db.parking_log().await.pop().unwrap();
    assert_eq!(
        (last.0.as_deref(), last.2.as_str(), last.3, last.4.as_str()),
        (Some("balances"), "skipped", Some(2), "bad data")
    );

    // A re-drive needs the consumer's code: refused with the way to do it.
    let refused = db.thalo(&["parked", "retry", ACCOUNT, &b, "--consumer", "balances"]);
    assert!(
        refused.fails(2).contains("redrive_projection"),
        "{refused:?}"
    );
    let missing = db.thalo(&[
        "parked",
        "skip",
        ACCOUNT,
        "nobody",
        "--consumer",
        "balances",
        "--reason",
        "x",
    ]);
    assert!(
        missing
            .fails(1)
            .contains("(consumer `balances`) is not parked"),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn projection_list_and_reset() {
    let Scene {
        db,
        a,
        b,
        positions,
        ..
    } = scene().await;
    db.store
        .save_checkpoint("store_view", positions[1])
        .await
        .unwrap();
    let balances = Noop {
        name: "balances".into(),
    };
    let a_events = db
        .store
        .read_stream::<common::Account>(&a, 0)
        .await
        .unwrap();
    db.store
        .apply_exactly_once(&balances, &a_events)
        .await
        .unwrap();
    db.store
        .park_stream("balances", ACCOUNT, &b, 1, "gap")
        .await
        .unwrap();

    let list = db.thalo(&["projection", "list", "--json"]).json();
    let projections = &list["projections"];
    let store_view = find(projections, "name", "store_view");
    assert_eq!(store_view["kind"], "store-fed");
    assert_eq!(store_view["position"], positions[1]);
    assert_eq!(store_view["behind"], 3, "a3, b1, b2");
    let kafka_fed = find(projections, "name", "balances");
    assert_eq!(kafka_fed["kind"], "kafka-fed");
    assert_eq!(kafka_fed["streams"], 2);
    assert_eq!(
        kafka_fed["behind"], 2,
        "a is applied, b's two events are not"
    );
    assert_eq!(kafka_fed["parked_streams"], 1);
    let text = db.thalo(&["projection", "list"]).ok().to_owned();
    for expected in [
        "store_view",
        "store-fed",
        "balances",
        "kafka-fed",
        "2 streams",
    ] {
        assert!(text.contains(expected), "no `{expected}` in:\n{text}");
    }

    // Without --yes nothing happens.
    let refused = db.thalo(&["projection", "reset", "balances"]);
    assert!(refused.fails(2).contains("--yes"), "{refused:?}");
    assert_eq!(
        db.count("stream_checkpoints", "projection = 'balances'")
            .await,
        2
    );

    let reset = db
        .thalo(&["projection", "reset", "balances", "--yes", "--json"])
        .json();
    assert_eq!(
        (
            &reset["checkpoints"],
            &reset["stream_checkpoints"],
            &reset["parked_streams"]
        ),
        (&json!(0), &json!(2), &json!(1))
    );
    assert_eq!(
        db.count("stream_checkpoints", "projection = 'balances'")
            .await,
        0
    );
    assert_eq!(
        db.count("consumer_parked", "consumer = 'balances'").await,
        0
    );
    let last = db.parking_log().await.pop().unwrap();
    assert_eq!(
        (last.0.as_deref(), last.1.as_str(), last.2.as_str()),
        (Some("balances"), b.as_str(), "reset")
    );
    assert_eq!(
        db.count("checkpoints", "name = 'store_view'").await,
        1,
        "others untouched"
    );

    let text = db
        .thalo(&["projection", "reset", "store_view", "--yes"])
        .ok()
        .to_owned();
    assert!(text.contains("deleted 1 checkpoint"), "{text}");
    assert!(
        text.contains("read-model tables are the projection's own"),
        "{text}"
    );
    assert!(text.contains("--reset-group"), "{text}");
    assert_eq!(db.count("checkpoints", "true").await, 0);
    let list = db.thalo(&["projection", "list", "--json"]).json();
    assert_eq!(list["projections"], json!([]));

    let unknown = db.thalo(&["projection", "reset", "nope", "--yes"]);
    assert!(
        unknown
            .fails(1)
            .contains("no projection or handler named `nope`"),
        "{unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn projection_reset_can_delete_the_consumer_group() {
    let brokers = common::require_kafka().await;
    let db = TestDb::new().await;
    let events = db.deposit(&random_name("a"), 0, 1).await;
    let group = random_name("balances");
    db.store
        .apply_exactly_once(
            &Noop {
                name: group.clone(),
            },
            &events,
        )
        .await
        .unwrap();
    let topic = random_name("t");
    common::create_topic(&topic, 1).await;
    common::produce(&common::producer(), &topic, "k", "{}", &[]).await;
    common::commit(&group, &topic, 1);
    assert_eq!(common::committed(&group, &topic), Offset::Offset(1));

    let reset = db
        .thalo(&[
            "projection",
            "reset",
            &group,
            "--yes",
            "--reset-group",
            "--brokers",
            &brokers,
            "--json",
        ])
        .json();
    assert_eq!(reset["group_deleted"], group.as_str());
    assert_eq!(reset["stream_checkpoints"], 1);
    assert_eq!(
        common::committed(&group, &topic),
        Offset::Invalid,
        "offsets gone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn republish_puts_events_back_into_the_outbox_in_order() {
    let db = TestDb::new().await;
    let (a, b) = (random_name("a"), random_name("b"));
    // Interleaved: a1 a2 b1 a3 b2.
    let mut positions = Vec::new();
    positions.extend(db.deposit(&a, 0, 2).await.iter().map(|e| e.position as i64));
    positions.extend(db.deposit(&b, 0, 1).await.iter().map(|e| e.position as i64));
    positions.extend(db.deposit(&a, 2, 1).await.iter().map(|e| e.position as i64));
    positions.extend(db.deposit(&b, 1, 1).await.iter().map(|e| e.position as i64));
    // Everything was published.
    sqlx::query(&format!("DELETE FROM {}", db.table("outbox")))
        .execute(&db.pool)
        .await
        .unwrap();

    let (from, to) = (positions[1].to_string(), positions[3].to_string());
    let report = db
        .thalo(&[
            "republish",
            "--from",
            &from,
            "--to",
            &to,
            "--batch-size",
            "2",
            "--json",
        ])
        .json();
    assert_eq!(report["events"], 3);
    assert_eq!(report["batches"], 2);
    assert_eq!(report["first_position"], positions[1]);
    assert_eq!(report["last_position"], positions[3]);
    assert_eq!(db.outbox_positions().await, positions[1..=3]);

    // Only b's events, from the start to the head; a dry run first.
    let only_b = ["republish", "--from", "0", "--aggregate-type", ACCOUNT];
    let dry = db
        .thalo(&[&only_b[..], &["--dry-run", "--json"]].concat())
        .json();
    assert_eq!(
        (dry["events"].clone(), dry["dry_run"].clone()),
        (json!(5), json!(true))
    );
    assert_eq!(
        db.outbox_positions().await.len(),
        3,
        "a dry run inserts nothing"
    );
    let text = db
        .thalo(&[
            "republish",
            "--from",
            &positions[2].to_string(),
            "--to",
            &positions[4].to_string(),
        ])
        .ok()
        .to_owned();
    assert!(text.contains("republished 3 events"), "{text}");
    assert!(text.contains("the relay publishes them next"), "{text}");
    let mut expected = positions[1..=3].to_vec();
    expected.extend_from_slice(&positions[2..=4]);
    assert_eq!(
        db.outbox_positions().await,
        expected,
        "appended, in position order"
    );

    let empty = db
        .thalo(&[
            "republish",
            "--from",
            &(positions[4] + 1).to_string(),
            "--json",
        ])
        .json();
    assert_eq!(empty["events"], 0);
    let backwards = db.thalo(&["republish", "--from", "5", "--to", "2"]);
    assert!(
        backwards.fails(2).contains("--from 5 is after --to 2"),
        "{backwards:?}"
    );
    assert_eq!(db.outbox_positions().await.len(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_publishes_republished_events_again() {
    let brokers = common::require_kafka().await;
    let db = TestDb::new().await;
    let a = random_name("a");
    let positions: Vec<u64> = db
        .deposit(&a, 0, 3)
        .await
        .iter()
        .map(|e| e.position)
        .collect();
    let prefix = format!("{}.", random_name("t"));
    let topic = format!("{prefix}{ACCOUNT}");
    let relay = thalo_kafka::KafkaRelay::from_store(&db.store, brokers.clone())
        .with_topic_naming(thalo_kafka::TopicNaming::prefixed(prefix.clone()))
        .with_topic_settings(thalo_kafka::TopicSettings::default().with_partitions(1))
        .with_poll_interval(Duration::from_millis(100));
    let shutdown = thalo::Shutdown::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let drained = |db: TestDb| async move { db.count("outbox", "true").await == 0 };
    common::eventually(Duration::from_secs(30), "the relay to publish", || {
        drained(db.clone())
    })
    .await;
    assert_eq!(common::sequences(&topic, 3).await, [1, 2, 3]);

    // Events 2 and 3 once more: the relay publishes them again, in order.
    let report = db
        .thalo(&["republish", "--from", &positions[1].to_string(), "--json"])
        .json();
    assert_eq!(report["events"], 2);
    common::eventually(Duration::from_secs(30), "the relay to republish", || {
        drained(db.clone())
    })
    .await;
    assert_eq!(common::sequences(&topic, 5).await, [1, 2, 3, 2, 3]);
    shutdown.trigger();
    running.await.expect("relay task").expect("relay");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_the_store_in_an_empty_schema() {
    let db = TestDb::empty().await;
    let before = db.thalo(&["status"]);
    assert!(
        before
            .fails(1)
            .contains("has no Thalo event store; run `thalo migrate` first"),
        "{before:?}"
    );

    let report = db.thalo(&["migrate", "--json"]).json();
    assert_eq!(report["schema"], db.schema.as_str());
    let migrations = report["migrations"].as_array().unwrap();
    assert!(migrations.len() >= 3, "{report}");
    assert_eq!(report["applied"], migrations.len());
    let versions: Vec<i64> = migrations
        .iter()
        .map(|m| m["version"].as_i64().unwrap())
        .collect();
    assert_eq!(&versions[..3], [1, 2, 3]);
    assert!(migrations.iter().all(|m| m["success"] == true));
    for table in [
        "events",
        "outbox",
        "checkpoints",
        "stream_checkpoints",
        "consumer_parked",
    ] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(db.table(table))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(exists, "{table} was created");
    }

    let again = db.thalo(&["migrate"]).ok().to_owned();
    assert!(
        again.contains(&format!("schema `{}` is up to date", db.schema)),
        "{again}"
    );
    assert_eq!(db.thalo(&["status", "--json"]).json()["head_position"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_list_and_show_read_dead_letters_without_a_group() {
    let brokers = common::require_kafka().await;
    let suffix = format!(".{}", random_name("dlq"));
    let topic = format!("{}{suffix}", random_name("t"));
    common::create_topic(&topic, 1).await;
    let producer = common::producer();
    let dead_letter = |n: &'static str, reason: &'static str| {
        vec![
            ("ce_id", "6f1c1c1e-0000-4000-8000-000000000000"),
            ("ce_type", "Deposited"),
            ("thalo_aggregate_type", ACCOUNT),
            ("thalo_aggregate_id", "acc-1"),
            ("thalo_sequence", n),
            ("thalo_dlq_error", "handler `balances` failed: boom"),
            ("thalo_dlq_reason", reason),
            ("thalo_dlq_attempts", "3"),
            ("thalo_dlq_topic", "bank_account"),
            ("thalo_dlq_partition", "2"),
            ("thalo_dlq_offset", "41"),
            ("thalo_dlq_group", "balances"),
            ("thalo_dlq_time", "2026-01-02T03:04:05.000Z"),
        ]
    };
    let first = common::produce(
        &producer,
        &topic,
        "acc-1",
        r#"{"amount":100}"#,
        &dead_letter("3", "handler"),
    )
    .await;
    let second = common::produce(
        &producer,
        &topic,
        "acc-1",
        r#"{"amount":7}"#,
        &dead_letter("4", "held"),
    )
    .await;
    let kafka = ["--brokers", brokers.as_str()];

    let list =
        common::thalo(&[&["dlq", "list", "--topic", &topic, "--json"][..], &kafka].concat()).json();
    assert_eq!(list["topics"], json!([topic]));
    let messages = list["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{list}");
    assert_eq!(
        messages[0],
        json!({
            "topic": topic,
            "partition": 0,
            "offset": first,
            "reason": "handler",
            "error": "handler `balances` failed: boom",
            "group": "balances",
            "attempts": "3",
            "original_topic": "bank_account",
            "original_partition": "2",
            "original_offset": "41",
            "aggregate_type": ACCOUNT,
            "aggregate_id": "acc-1",
            "sequence": "3",
            "dead_lettered_at": "2026-01-02T03:04:05.000Z",
        })
    );
    assert_eq!(messages[1]["offset"], second);
    assert_eq!(messages[1]["reason"], "held");

    // Found by suffix, and as a table.
    let text = common::thalo(&[&["dlq", "list", "--suffix", &suffix][..], &kafka].concat())
        .ok()
        .to_owned();
    assert!(text.contains(&format!("Dead letters ({topic})")), "{text}");
    assert!(text.contains("handler") && text.contains("held"), "{text}");
    assert!(text.contains("bank_account/2@41"), "{text}");
    // The most recent one only.
    let last = common::thalo(
        &[
            &["dlq", "list", "--topic", &topic, "--limit", "1", "--json"][..],
            &kafka,
        ]
        .concat(),
    )
    .json();
    assert_eq!(last["messages"].as_array().unwrap().len(), 1);
    assert_eq!(last["messages"][0]["offset"], second);

    let (partition, offset) = ("0".to_owned(), first.to_string());
    let show = common::thalo(
        &[
            &["dlq", "show", &topic, &partition, &offset, "--json"][..],
            &kafka,
        ]
        .concat(),
    )
    .json();
    assert_eq!(show["value"], json!({"amount": 100}));
    assert_eq!(show["key"], "acc-1");
    assert_eq!(show["reason"], "handler");
    let headers = show["headers"].as_array().unwrap();
    assert_eq!(headers.len(), 13);
    assert_eq!(
        headers[0],
        json!({"key": "ce_id", "value": "6f1c1c1e-0000-4000-8000-000000000000"})
    );
    let text = common::thalo(&[&["dlq", "show", &topic, &partition, &offset][..], &kafka].concat())
        .ok()
        .to_owned();
    assert!(
        text.contains("Headers") && text.contains("thalo_dlq_error"),
        "{text}"
    );
    assert!(
        text.contains("\"amount\": 100"),
        "pretty JSON value: {text}"
    );

    let missing = common::thalo(&[&["dlq", "show", &topic, "0", "99"][..], &kafka].concat());
    assert!(
        missing.fails(1).contains(&format!(
            "no message at offset 99 of partition 0 of topic `{topic}`"
        )),
        "{missing:?}"
    );
    let unknown = common::thalo(
        &[
            &["dlq", "list", "--topic", "no-such-topic-here"][..],
            &kafka,
        ]
        .concat(),
    );
    assert!(
        unknown.fails(1).contains("no-such-topic-here"),
        "{unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_and_connection_errors_exit_clearly() {
    // No database named at all.
    let run = common::thalo(&["status"]);
    assert!(
        run.fails(2)
            .contains("pass --database-url or set DATABASE_URL"),
        "{run:?}"
    );
    // Clap's own usage errors.
    assert_eq!(common::thalo(&["no-such-command"]).code, Some(2));
    assert_eq!(
        common::thalo(&["republish"]).code,
        Some(2),
        "--from is required"
    );
    // An invalid schema name.
    let run = common::thalo(&[
        "--database-url",
        "postgres://x@127.0.0.1:1/x",
        "--schema",
        "Bad",
        "status",
    ]);
    assert!(run.fails(1).contains("schema name `Bad`"), "{run:?}");
    // Postgres unreachable.
    let run = common::thalo(&[
        "--database-url",
        "postgres://postgres@127.0.0.1:1/thalo_test",
        "--pg-acquire-timeout-ms",
        "2000",
        "parked",
        "list",
    ]);
    let error = run.fails(1);
    assert!(
        error.starts_with("error: cannot connect to Postgres"),
        "{error}"
    );
    assert_eq!(error.lines().count(), 1, "{error}");
    // Kafka unreachable for a command that needs it.
    let run = common::thalo(&[
        "dlq",
        "list",
        "--brokers",
        "127.0.0.1:1",
        "--kafka-timeout-ms",
        "500",
    ]);
    assert!(
        run.fails(1).contains("reading the cluster's topics"),
        "{run:?}"
    );
}

/// Counts deposits per account into the version's table.
struct Deposits {
    table: thalo_postgres::ReadModelTable,
}

impl Deposits {
    async fn new(db: &TestDb, version: u32) -> Deposits {
        let table =
            thalo_postgres::ReadModelTable::new(db.store.schema(), "deposits", version).unwrap();
        sqlx::query(&format!(
            "CREATE TABLE {} (id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
            table.table()
        ))
        .execute(&db.pool)
        .await
        .unwrap();
        Deposits { table }
    }
}

impl thalo_postgres::PgProjection<common::AccountEvent> for Deposits {
    fn name(&self) -> &str {
        "deposits"
    }

    fn version(&self) -> u32 {
        self.table.version()
    }

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        envelope: &thalo::EventEnvelope<common::AccountEvent>,
    ) -> Result<(), thalo::Error> {
        sqlx::query(&format!(
            "INSERT INTO {} AS d (id, n) VALUES ($1, 1)
             ON CONFLICT (id) DO UPDATE SET n = d.n + 1",
            self.table.table()
        ))
        .bind(&envelope.aggregate_id)
        .execute(tx)
        .await
        .map_err(|e| thalo::Error::store("counting deposits", e))?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn projection_versions_rebuild_promote_and_drop() {
    let db = TestDb::new().await;
    let accounts: Vec<String> = (0..3).map(|_| random_name("a")).collect();
    for account in &accounts {
        db.deposit(account, 0, 10).await;
    }
    let subscription = |projection: Deposits| {
        let table = projection.table.clone();
        thalo_postgres::PgSubscription::new::<common::Account>(db.store.clone(), projection)
            .with_batch_size(5)
            .with_poll_interval(Duration::from_millis(20))
            .with_read_model(vec![table])
    };
    let view = db.table("deposits");

    // Version 1 is live and keeps applying new events; writers keep depositing and
    // readers keep reading the view while version 2 is deployed and builds, and
    // `thalo projection rebuild` watches it until it takes over.
    let v1 = subscription(Deposits::new(&db, 1).await);
    v1.catch_up().await.unwrap();
    let stop = thalo::Shutdown::new();
    let v1 = tokio::spawn(v1.run(stop.clone()));
    let writer = tokio::spawn({
        let (db, accounts, stop) = (db.clone(), accounts.clone(), stop.clone());
        async move {
            let mut versions = vec![10_u64; accounts.len()];
            let mut written = 0;
            while !stop.is_triggered() {
                let i = written % accounts.len();
                db.deposit(&accounts[i], versions[i], 1).await;
                versions[i] += 1;
                written += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written
        }
    });
    let reader = tokio::spawn({
        let (pool, view, stop) = (db.pool.clone(), view.clone(), stop.clone());
        async move {
            let (mut reads, mut failures) = (0, Vec::new());
            while !stop.is_triggered() {
                match sqlx::query_scalar::<_, Option<i64>>(&format!(
                    "SELECT sum(n)::BIGINT FROM {view}"
                ))
                .fetch_one(&pool)
                .await
                {
                    Ok(_) => reads += 1,
                    Err(err) => failures.push(err.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (reads, failures)
        }
    });
    let watch = tokio::task::spawn_blocking({
        let db = db.clone();
        move || {
            db.thalo(&[
                "--json",
                "projection",
                "rebuild",
                "deposits",
                "2",
                "--interval-ms",
                "20",
                "--timeout-secs",
                "60",
            ])
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = tokio::spawn(subscription(Deposits::new(&db, 2).await).run(stop.clone()));
    let watched = watch.await.unwrap().json();
    assert_eq!(watched["state"], "live", "{watched}");
    assert_eq!(watched["version"], 2);
    // Writes went on through the swap; then everything stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.trigger();
    let written = writer.await.unwrap();
    let (reads, failures) = reader.await.unwrap();
    v1.await.unwrap().unwrap();
    v2.await.unwrap().unwrap();
    assert!(written > 0, "writes went on during the rebuild");
    assert!(reads > 0, "reads went on during the rebuild: {failures:?}");
    assert!(
        failures.is_empty(),
        "reads failed during the swap: {failures:?}"
    );

    // Both versions catch up with the last writes (they stopped with the writers).
    // Version 2 is the fold of the store: one row per account, one count per deposit.
    for version in [1, 2] {
        subscription(Deposits {
            table: thalo_postgres::ReadModelTable::new(db.store.schema(), "deposits", version)
                .unwrap(),
        })
        .catch_up()
        .await
        .unwrap();
    }
    let fold: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT aggregate_id, count(*) FROM {} GROUP BY aggregate_id ORDER BY aggregate_id",
        db.table("events")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let rebuilt: Vec<(String, i64)> =
        sqlx::query_as(&format!("SELECT id, n FROM {view} ORDER BY id"))
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rebuilt, fold,
        "the view (version 2) equals the fold of the store"
    );
    let total: i64 = fold.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 30 + written as i64);

    let versions = db
        .thalo(&["--json", "projection", "versions", "deposits"])
        .json();
    let list = &versions["versions"];
    assert_eq!(find(list, "checkpoint", "deposits")["state"], "retired");
    let v2 = find(list, "checkpoint", "deposits@v2");
    assert_eq!(v2["state"], "live");
    assert_eq!(v2["position"], versions["head"]);
    let text = db
        .thalo(&["projection", "versions", "deposits"])
        .ok()
        .to_owned();
    assert!(
        text.contains("deposits@v2") && text.contains("retired"),
        "{text}"
    );

    // Roll back to version 1, then forward again; readers follow the view.
    let read = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT sum(n)::BIGINT FROM {view}"))
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(read().await, total);
    db.thalo(&["projection", "promote", "deposits", "1"])
        .fails(2);
    db.thalo(&["projection", "promote", "deposits", "1", "--yes"])
        .ok();
    assert_eq!(db.store.live_version("deposits").await.unwrap(), Some(1));
    assert_eq!(read().await, total, "version 1 applied every event too");
    db.thalo(&["projection", "promote", "deposits", "2", "--yes"])
        .ok();

    // The live version cannot be dropped; the retired one can, with its table.
    let refused = db
        .thalo(&["projection", "drop", "deposits", "2", "--yes"])
        .fails(1)
        .to_owned();
    assert!(refused.contains("is live"), "{refused}");
    db.thalo(&["projection", "drop", "deposits", "1"]).fails(2);
    let dropped = db
        .thalo(&["--json", "projection", "drop", "deposits", "1", "--yes"])
        .json();
    assert_eq!(dropped["action"], "dropped");
    let gone: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(db.table("deposits_v1"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(gone, None);
    db.thalo(&["projection", "drop", "deposits", "1", "--yes"])
        .fails(1);
    db.thalo(&["projection", "versions", "nothing"]).fails(1);
    let timeout = db
        .thalo(&[
            "projection",
            "rebuild",
            "deposits",
            "3",
            "--timeout-secs",
            "1",
            "--interval-ms",
            "100",
        ])
        .fails(1)
        .to_owned();
    assert!(timeout.contains("not deployed"), "{timeout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_redrive_asks_the_running_consumer_and_reports_the_outcome() {
    let brokers = common::require_kafka().await;
    let db = TestDb::new().await;
    let a = random_name("a");
    db.deposit(&a, 0, 3).await;
    // The projection's checkpoint key is its group, so a fresh name per run.
    let name = random_name("balances");
    let balances = name.as_str();
    db.store
        .park_stream(balances, ACCOUNT, &a, 2, "a bug in the projection")
        .await
        .unwrap();

    // Not parked: refused.
    db.thalo(&["dlq", "redrive", "--consumer", balances, ACCOUNT, "nobody"])
        .fails(1);
    // Recorded; with no consumer running it stays a request.
    let requested = db
        .thalo(&[
            "--json",
            "dlq",
            "redrive",
            "--consumer",
            balances,
            ACCOUNT,
            &a,
        ])
        .json();
    assert_eq!(requested["outcome"], "requested");
    assert_eq!(
        db.store.redrive_requests(balances).await.unwrap(),
        [(ACCOUNT.to_owned(), a.clone())]
    );
    let timeout = db
        .thalo(&[
            "dlq",
            "redrive",
            "--consumer",
            balances,
            ACCOUNT,
            &a,
            "--wait-secs",
            "1",
        ])
        .fails(1)
        .to_owned();
    assert!(timeout.contains("is it running?"), "{timeout}");

    // The consumer tries and fails: the command says why.
    let waiting = tokio::task::spawn_blocking({
        let (db, a, name) = (db.clone(), a.clone(), name.clone());
        move || {
            let balances = name.as_str();
            db.thalo(&[
                "dlq",
                "redrive",
                "--consumer",
                balances,
                ACCOUNT,
                &a,
                "--wait-secs",
                "30",
            ])
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.store
        .fail_redrive_request(balances, ACCOUNT, &a, "still broken: division by zero")
        .await
        .unwrap();
    let failed = waiting.await.unwrap();
    let error = failed.fails(1);
    assert!(error.contains("still broken: division by zero"), "{error}");

    // The consumer re-drives it: the command reports success.
    let waiting = tokio::task::spawn_blocking({
        let (db, a, name) = (db.clone(), a.clone(), name.clone());
        move || {
            let balances = name.as_str();
            db.thalo(&[
                "--json",
                "dlq",
                "redrive",
                "--consumer",
                balances,
                ACCOUNT,
                &a,
                "--wait-secs",
                "30",
            ])
        }
    });
    // A real consumer of the projection, running: it looks for requests once a second,
    // re-drives the stream from the store (events 2 and 3) and records the outcome.
    let prefix = format!("{}.", random_name("t"));
    let shutdown = thalo::Shutdown::new();
    let consumer = tokio::spawn(
        thalo_kafka::KafkaConsumer::for_projection(brokers)
            .with_topic_naming(thalo_kafka::TopicNaming::prefixed(prefix))
            .with_topic_settings(thalo_kafka::TopicSettings::default().with_partitions(1))
            .subscribe::<common::Account>()
            .run_projection(
                db.store.clone(),
                Noop { name: name.clone() },
                shutdown.clone(),
            ),
    );
    let done = waiting.await.unwrap().json();
    assert_eq!(done["outcome"], "redriven", "{done}");
    assert!(
        db.store
            .parked_streams(Some(balances))
            .await
            .unwrap()
            .is_empty(),
        "no longer parked"
    );
    shutdown.trigger();
    consumer.await.unwrap().unwrap();
    let actions: Vec<String> = db
        .parking_log()
        .await
        .into_iter()
        .map(|(_, _, action, _, _)| action)
        .collect();
    assert_eq!(
        actions,
        [
            "parked",
            "redrive_requested",
            "redrive_requested",
            "redrive_requested",
            "redrive_failed",
            "redrive_requested",
            "redriven"
        ]
    );
}
