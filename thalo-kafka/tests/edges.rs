//! The pipeline's edges: a refused event parks only its aggregate, a failing projection
//! parks only its stream and is re-driven exactly once, a blocked partition does not
//! stop the others.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rdkafka::Message;
use sqlx::PgConnection;
use thalo::{Error, EventEnvelope, EventHandler, EventStore, Metadata};
use thalo_postgres::{PgEventStore, PgProjection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Records (aggregate, sequence) in arrival order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, u64)>>>);

impl Recorder {
    fn of(&self, id: &str) -> Vec<u64> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a == id)
            .map(|(_, s)| *s)
            .collect()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl EventHandler<AccountEvent> for Recorder {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        self.0
            .lock()
            .unwrap()
            .push((envelope.aggregate_id.clone(), envelope.sequence));
        Ok(())
    }
}

/// Appends a deposit of 1 at `version`; returns the stored event.
async fn deposit(
    store: &PgEventStore,
    id: &str,
    version: u64,
    metadata: &Metadata,
) -> Vec<EventEnvelope<AccountEvent>> {
    store
        .append::<Account>(
            &id.to_owned(),
            version,
            vec![AccountEvent::Deposited(DepositedEvent { amount: 1 })],
            metadata,
        )
        .await
        .expect("append")
}

fn spawn_relay(
    relay: thalo_kafka::KafkaRelay,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    (stop, task)
}

/// A 2 MB event on aggregate A is refused by Kafka (larger than `message.max.bytes`):
/// A is parked with the error, its later events wait behind it, and 1,000 events of
/// other aggregates reach a consumer within seconds. After the limit is raised and A is
/// retried, A's events arrive in order. With `max_event_bytes`, the store refuses such
/// an event up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_parks_its_aggregate_and_the_others_flow() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, _topic) = naming();

    // The default store refuses the event before storing anything.
    let big = Metadata::default().with_header("blob", "x".repeat(2 * 1024 * 1024));
    let refused = db
        .store
        .append::<Account>(
            &"acc-big".to_owned(),
            0,
            vec![AccountEvent::Deposited(DepositedEvent { amount: 1 })],
            &big,
        )
        .await
        .expect_err("over max_event_bytes");
    assert!(
        matches!(refused, Error::EventTooLarge { limit: 900_000, .. }),
        "{refused:?}"
    );
    assert_eq!(db.outbox_len().await, 0, "nothing stored");

    // A store without the limit stores it; Kafka will refuse it.
    let unlimited = PgEventStore::builder(db.pool.clone())
        .schema(db.schema.clone())
        .max_event_bytes(usize::MAX)
        .build()
        .expect("store");
    deposit(&unlimited, "acc-big", 0, &big).await;
    deposit(&unlimited, "acc-big", 1, &Metadata::default()).await;
    deposit(&unlimited, "acc-big", 2, &Metadata::default()).await;
    let others = 50;
    let per_other = 20;
    for round in 0..per_other {
        for a in 0..others {
            deposit(&db.store, &format!("acc-{a}"), round, &Metadata::default()).await;
        }
    }

    let recorder = Recorder::default();
    let consumer_stop = CancellationToken::new();
    let consumer_task =
        tokio::spawn(consumer(&naming).run(recorder.clone(), consumer_stop.clone()));
    let relay = db.relay(&naming);
    let (relay_stop, relay_task) = spawn_relay(relay.clone());

    let started = std::time::Instant::now();
    eventually(
        Duration::from_secs(60),
        "the other aggregates' events",
        || async { recorder.len() >= (others * per_other) as usize },
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(30),
        "the other aggregates took {elapsed:?}"
    );
    for a in 0..others {
        assert_eq!(
            recorder.of(&format!("acc-{a}")),
            (1..=per_other).collect::<Vec<_>>()
        );
    }
    assert!(
        recorder.of("acc-big").is_empty(),
        "A waits behind its refused event"
    );

    let parked = relay.parked().await.expect("parked");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].aggregate_id, "acc-big");
    assert_eq!(parked[0].sequence, 1);
    assert_eq!(parked[0].waiting, 3);
    assert!(
        parked[0].error.to_lowercase().contains("too large"),
        "{}",
        parked[0].error
    );
    let lag = relay.lag().await.expect("lag");
    assert_eq!((lag.pending, lag.parked), (3, 1));
    assert_eq!(relay.status().parked, 1);
    let logged: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.parking_log WHERE aggregate_id = 'acc-big' AND action = 'parked'",
        db.schema
    ))
    .fetch_one(&db.pool)
    .await
    .expect("parking log");
    assert_eq!(logged, 1);

    // The operator raises the limit (here the producer's; on a real cluster also the
    // topic's max.message.bytes) and retries A.
    relay_stop.cancel();
    relay_task.await.expect("relay task").expect("relay");
    let relay = db.relay(&naming).set("message.max.bytes", "10000000");
    let (relay_stop, relay_task) = spawn_relay(relay.clone());
    assert!(relay.retry("account", "acc-big").await.expect("retry"));
    assert!(!relay
        .retry("account", "acc-big")
        .await
        .expect("retry again"));
    eventually(Duration::from_secs(60), "A's events", || async {
        recorder.of("acc-big").len() >= 3
    })
    .await;
    assert_eq!(recorder.of("acc-big"), vec![1, 2, 3]);
    eventually(Duration::from_secs(30), "the outbox to drain", || async {
        db.outbox_len().await == 0
    })
    .await;
    assert!(relay.parked().await.expect("parked").is_empty());

    relay_stop.cancel();
    consumer_stop.cancel();
    relay_task.await.expect("relay task").expect("relay");
    consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    db.drop_schema().await;
}

/// The test projection, failing on one chosen event while `broken` is set.
#[derive(Clone)]
struct Flaky {
    inner: Balances,
    broken: Arc<AtomicBool>,
    fails_on: (&'static str, u64),
}

impl PgProjection<AccountEvent> for Flaky {
    fn name(&self) -> &str {
        "balances"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        if self.broken.load(Ordering::SeqCst)
            && envelope.aggregate_id == self.fails_on.0
            && envelope.sequence == self.fails_on.1
        {
            return Err(Error::handler("balances", "a bug in the projection"));
        }
        self.inner.handle(tx, envelope).await
    }
}

/// The fold of the stored events: account -> (balance, events, last sequence).
async fn fold(store: &PgEventStore, accounts: &[String]) -> HashMap<String, (i64, i64, i64)> {
    let mut folded = HashMap::new();
    for id in accounts {
        let events = store.read_stream::<Account>(id, 0).await.expect("read");
        let balance = events
            .iter()
            .map(|e| match &e.event {
                AccountEvent::Deposited(d) => d.amount,
                AccountEvent::Withdrew(w) => -w.amount,
            })
            .sum();
        folded.insert(
            id.clone(),
            (balance, events.len() as i64, events.len() as i64),
        );
    }
    folded
}

/// A projection whose handler fails for good on event 3 of one account: that stream is
/// parked (3 and everything after it held), the other accounts keep flowing; after the
/// fix, a re-drive applies the stream from the store exactly once and the read model
/// equals the fold of the stored events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_projection_parks_one_stream_and_a_redrive_fixes_it() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, _topic) = naming();
    let accounts: Vec<String> = (0..10).map(|a| format!("acc-{a}")).collect();
    for round in 0..6 {
        for id in &accounts {
            deposit(&db.store, id, round, &Metadata::default()).await;
        }
    }
    let broken = Arc::new(AtomicBool::new(true));
    let projection = Flaky {
        inner: db.projection(),
        broken: Arc::clone(&broken),
        fails_on: ("acc-3", 3),
    };

    let (relay_stop, relay_task) = spawn_relay(db.relay(&naming));
    let consumer_stop = CancellationToken::new();
    let consumer_task = tokio::spawn(projection_consumer(&naming).run_projection(
        db.store.clone(),
        projection.clone(),
        consumer_stop.clone(),
    ));

    // The healthy accounts are applied whole.
    let healthy: Vec<&String> = accounts.iter().filter(|id| *id != "acc-3").collect();
    let mut stored = Vec::new();
    for id in &healthy {
        stored.extend(db.store.read_stream::<Account>(id, 0).await.expect("read"));
    }
    db.store
        .wait_until_projected(&projection, &stored, Duration::from_secs(60))
        .await
        .expect("the healthy accounts are applied");
    let balances = db.balances().await;
    for id in &healthy {
        assert_eq!(balances[*id], (6, 6, 6, 0), "{id}");
    }
    // Waiting for acc-3 ends at once with an error when its stream is parked.
    let acc3 = db
        .store
        .read_stream::<Account>(&"acc-3".to_owned(), 0)
        .await
        .expect("read");
    let parked = db
        .store
        .wait_until_projected(&projection, &acc3, Duration::from_secs(30))
        .await
        .expect_err("acc-3 is parked at its event 3");
    assert!(
        matches!(&parked, Error::Handler { .. }) && format!("{parked:?}").contains("is parked"),
        "{parked:?}"
    );
    // More events of the parked account, and of a healthy one: held and applied.
    deposit(&db.store, "acc-3", 6, &Metadata::default()).await;
    let acc0 = deposit(&db.store, "acc-0", 6, &Metadata::default()).await;
    db.store
        .wait_until_projected(&projection, &acc0, Duration::from_secs(30))
        .await
        .expect("acc-0's new event is applied");
    assert_eq!(db.balances().await["acc-0"], (7, 7, 7, 0));
    eventually(
        Duration::from_secs(30),
        "acc-3's events to be held",
        || async {
            let parked = db
                .store
                .parked_streams(Some("balances"))
                .await
                .expect("parked");
            parked.first().is_some_and(|p| p.held >= 4)
        },
    )
    .await;
    let parked = db
        .store
        .parked_streams(Some("balances"))
        .await
        .expect("parked");
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(
        (parked[0].aggregate_id.as_str(), parked[0].sequence),
        ("acc-3", 3)
    );
    assert!(
        parked[0].error.contains("a bug in the projection"),
        "{}",
        parked[0].error
    );
    let acc3 = db.balances().await["acc-3"];
    assert_eq!((acc3.1, acc3.2), (2, 2), "acc-3 stopped before its event 3");

    // Still broken: the re-drive an operator asks for (`thalo dlq redrive`) is tried by
    // the running consumer, fails, and is withdrawn; nothing changes, the error is kept.
    let failed = db
        .store
        .redrive_projection(&projection, "account", "acc-3")
        .await
        .expect_err("still broken");
    assert!(matches!(failed, Error::Handler { .. }), "{failed:?}");
    assert!(db
        .store
        .request_redrive("balances", "account", "acc-3", "operator: try again")
        .await
        .expect("request"));
    eventually(
        Duration::from_secs(30),
        "the consumer to try the requested re-drive",
        || async {
            db.store
                .redrive_requests("balances")
                .await
                .expect("requests")
                .is_empty()
        },
    )
    .await;
    let still = db
        .store
        .parked_stream("balances", "account", "acc-3")
        .await
        .expect("parked")
        .expect("still parked");
    assert_eq!(still.sequence, 3);
    assert_eq!(db.balances().await["acc-3"].1, 2);
    let logged: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT action, detail FROM {}.parking_log WHERE aggregate_id = 'acc-3' ORDER BY id",
        db.schema
    ))
    .fetch_all(&db.pool)
    .await
    .expect("parking_log");
    let actions: Vec<&str> = logged.iter().map(|(action, _)| action.as_str()).collect();
    assert_eq!(actions, ["parked", "redrive_requested", "redrive_failed"]);
    assert!(
        logged[2].1.contains("a bug in the projection"),
        "{logged:?}"
    );

    // Fixed: the running consumer re-drives the stream on request: 3..7 from the store,
    // once.
    broken.store(false, Ordering::SeqCst);
    assert!(db
        .store
        .request_redrive("balances", "account", "acc-3", "operator: fixed in 1.2.3")
        .await
        .expect("request"));
    eventually(
        Duration::from_secs(30),
        "the consumer to re-drive acc-3",
        || async {
            db.store
                .parked_stream("balances", "account", "acc-3")
                .await
                .expect("parked")
                .is_none()
        },
    )
    .await;
    let acc3 = db.balances().await["acc-3"];
    assert_eq!((acc3.1, acc3.2), (7, 7), "applied 3..7 once");
    assert!(!db
        .store
        .request_redrive("balances", "account", "acc-3", "not parked any more")
        .await
        .expect("request"));
    assert!(db
        .store
        .redrive_projection(&projection, "account", "acc-3")
        .await
        .expect("redrive again")
        .is_none());
    // And it flows again.
    deposit(&db.store, "acc-3", 7, &Metadata::default()).await;
    let mut all = accounts.clone();
    all.sort();
    db.wait_until_projected(Duration::from_secs(30)).await;
    let expected: HashMap<String, (i64, i64, i64, i64)> = fold(&db.store, &all)
        .await
        .into_iter()
        .map(|(id, (balance, events, last))| (id, (balance, events, last, 0)))
        .collect();
    assert_eq!(
        db.balances().await,
        expected,
        "the read model equals the fold"
    );
    assert!(db
        .store
        .parked_streams(None)
        .await
        .expect("parked")
        .is_empty());

    relay_stop.cancel();
    consumer_stop.cancel();
    relay_task.await.expect("relay task").expect("relay");
    let stats = consumer_task
        .await
        .expect("consumer task")
        .expect("consumer");
    assert_eq!(stats.parked, 1);
    db.drop_schema().await;
}

/// Blocks on the first event of one aggregate until released; records the rest.
#[derive(Clone)]
struct Blocking {
    recorder: Recorder,
    blocked: String,
    release: Arc<Notify>,
    released: Arc<AtomicBool>,
}

impl EventHandler<AccountEvent> for Blocking {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        while envelope.aggregate_id == self.blocked && !self.released.load(Ordering::SeqCst) {
            let _ = tokio::time::timeout(Duration::from_millis(100), self.release.notified()).await;
        }
        self.recorder.handle(envelope).await
    }
}

/// One partition whose handler is stuck fills its queue; the consumer pauses that
/// partition and keeps handling the others (and keeps polling), instead of blocking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_partition_does_not_stop_the_others() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();
    let accounts: Vec<String> = (0..30).map(|a| format!("acc-{a}")).collect();
    let per_account = 20;
    for round in 0..per_account {
        for id in &accounts {
            deposit(&db.store, id, round, &Metadata::default()).await;
        }
    }
    let total = accounts.len() * per_account as usize;
    let (relay_stop, relay_task) = spawn_relay(db.relay(&naming));
    eventually(Duration::from_secs(60), "the outbox to drain", || async {
        db.outbox_len().await == 0
    })
    .await;
    // Which partition each account is in.
    let messages = read_topic(&topic, total, Duration::from_secs(60)).await;
    let partition_of: BTreeMap<String, i32> = messages
        .iter()
        .filter_map(|m| {
            let key = String::from_utf8(m.key()?.to_vec()).ok()?;
            Some((key, m.partition()))
        })
        .collect();
    let blocked = "acc-0".to_owned();
    let blocked_partition = partition_of[&blocked];
    let elsewhere: Vec<&String> = accounts
        .iter()
        .filter(|id| partition_of[*id] != blocked_partition)
        .collect();
    assert!(
        !elsewhere.is_empty(),
        "some accounts are in other partitions"
    );

    let handler = Blocking {
        recorder: Recorder::default(),
        blocked: blocked.clone(),
        release: Arc::new(Notify::new()),
        released: Arc::new(AtomicBool::new(false)),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        consumer(&naming)
            .with_queue_capacity(20)
            .run(handler.clone(), stop.clone()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !elsewhere
        .iter()
        .all(|id| handler.recorder.of(id).len() == per_account as usize)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the other partitions stalled behind partition {blocked_partition}: handled {:?}",
            accounts
                .iter()
                .map(|id| (id, partition_of[id], handler.recorder.of(id).len()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(handler.recorder.of(&blocked).is_empty());

    handler.released.store(true, Ordering::SeqCst);
    handler.release.notify_waiters();
    eventually(Duration::from_secs(60), "every event", || async {
        handler.recorder.len() == total
    })
    .await;
    for id in &accounts {
        assert_eq!(
            handler.recorder.of(id),
            (1..=per_account).collect::<Vec<_>>(),
            "{id} in order, once"
        );
    }
    stop.cancel();
    relay_stop.cancel();
    task.await.expect("consumer task").expect("consumer");
    relay_task.await.expect("relay task").expect("relay");
    db.drop_schema().await;
}

/// Fails on one chosen event of one account while `broken` is set; records the rest.
#[derive(Clone)]
struct FlakyHandler {
    recorder: Recorder,
    broken: Arc<AtomicBool>,
    fails_on: (&'static str, u64),
}

impl EventHandler<AccountEvent> for FlakyHandler {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        if self.broken.load(Ordering::SeqCst)
            && envelope.aggregate_id == self.fails_on.0
            && envelope.sequence == self.fails_on.1
        {
            return Err(Error::handler("mailer", "the mail server said no"));
        }
        self.recorder.handle(envelope).await
    }
}

/// A plain handler with a store parks durably: its later events are held; a re-drive
/// from the store hands them over in order, and later events flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_handler_parks_durably_and_is_redriven() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, topic) = naming();
    for round in 0..4 {
        for id in ["acc-a", "acc-b"] {
            deposit(&db.store, id, round, &Metadata::default()).await;
        }
    }
    let broken = Arc::new(AtomicBool::new(true));
    let handler = FlakyHandler {
        recorder: Recorder::default(),
        broken: Arc::clone(&broken),
        fails_on: ("acc-a", 2),
    };
    let group = random_name("mailer");
    let (relay_stop, relay_task) = spawn_relay(db.relay(&naming));
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        consumer_in_group(&naming, &group)
            .with_store(db.store.clone())
            .run(handler.clone(), stop.clone()),
    );
    eventually(
        Duration::from_secs(60),
        "acc-b and the held events",
        || async {
            handler.recorder.of("acc-b").len() == 4
                && db
                    .store
                    .parked_stream(&group, "account", "acc-a")
                    .await
                    .expect("parked")
                    .is_some_and(|p| p.sequence == 2)
        },
    )
    .await;
    assert_eq!(
        handler.recorder.of("acc-a"),
        vec![1],
        "acc-a stopped at its event 2"
    );
    // The record: event 2 (handler) and the two events held behind it.
    let dead = read_topic(&format!("{topic}.dlq"), 3, Duration::from_secs(30)).await;
    let reasons: Vec<_> = dead
        .iter()
        .map(|m| (header(m, "thalo_sequence"), header(m, "thalo_dlq_reason")))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    for (sequence, reason) in [("2", "handler"), ("3", "held"), ("4", "held")] {
        assert!(
            reasons.contains(&(Some(sequence.to_owned()), Some(reason.to_owned()))),
            "{reasons:?}"
        );
    }

    // Fixed: the re-drive hands over 2..4 from the store, in order.
    broken.store(false, Ordering::SeqCst);
    let redriven = db
        .store
        .redrive_handler(&group, &handler, "account", "acc-a")
        .await
        .expect("redrive")
        .expect("it was parked");
    assert_eq!((redriven.applied, redriven.sequence), (3, 4));
    assert_eq!(handler.recorder.of("acc-a"), vec![1, 2, 3, 4]);

    // The running consumer sees the stream released: the next event flows.
    deposit(&db.store, "acc-a", 4, &Metadata::default()).await;
    eventually(Duration::from_secs(30), "acc-a's next event", || async {
        handler.recorder.of("acc-a") == vec![1, 2, 3, 4, 5]
    })
    .await;
    assert!(db
        .store
        .parked_streams(None)
        .await
        .expect("parked")
        .is_empty());

    stop.cancel();
    relay_stop.cancel();
    let stats = task.await.expect("consumer task").expect("consumer");
    relay_task.await.expect("relay task").expect("relay");
    assert_eq!((stats.parked, stats.held), (1, 2));
    db.drop_schema().await;
}
