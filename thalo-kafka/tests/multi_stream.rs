//! A multi-stream projection fed from Kafka: the relay publishes two aggregate types to
//! two topics; one consumer with `subscribe_set` builds a view keyed by owner, exactly
//! once across a consumer crash that leaves every offset uncommitted.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use sqlx::{PgConnection, Row};
use thalo::{commands, events, Aggregate, Error, EventEnvelope, EventSet, EventStore, Metadata};
use thalo_kafka::{KafkaConsumer, TopicNaming};
use thalo_postgres::PgProjection;
use tokio_util::sync::CancellationToken;

/// An account that belongs to an owner.
#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "ms_account")]
pub struct OwnedAccount {
    #[identity]
    id: String,
}

#[commands]
impl OwnedAccount {
    pub fn open(&self, owner: String) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent { owner })
    }

    pub fn deposit(&self, cents: i64) -> Result<DepositedEvent, Error> {
        Ok(DepositedEvent { cents })
    }
}

#[events]
impl OwnedAccount {
    pub fn opened(&mut self, owner: String) {
        let _ = owner;
    }

    pub fn deposited(&mut self, cents: i64) {
        let _ = cents;
    }
}

/// A card charged to its owner; its events share the account's type names.
#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "ms_card")]
pub struct Card {
    #[identity]
    id: String,
}

#[commands]
impl Card {
    pub fn issue(&self, owner: String) -> Result<IssuedEvent, Error> {
        Ok(IssuedEvent { owner })
    }

    pub fn charge(&self, cents: i64) -> Result<ChargedEvent, Error> {
        Ok(ChargedEvent { cents })
    }
}

#[events]
impl Card {
    #[event(name = "Opened")]
    pub fn issued(&mut self, owner: String) {
        let _ = owner;
    }

    #[event(name = "Deposited")]
    pub fn charged(&mut self, cents: i64) {
        let _ = cents;
    }
}

thalo::event_set! {
    /// What the per-owner view reads.
    pub enum OwnerEvent {
        Account(OwnedAccount),
        Card(Card),
    }
}

/// Net money per owner and how many money events made it (`per_owner`), and each
/// account's and card's owner with the last sequence applied (`owners`). A money event
/// that does not follow its stream's last applied sequence fails: nothing may be
/// applied twice or out of order.
#[derive(Clone)]
struct PerOwner {
    schema: String,
}

impl PerOwner {
    async fn create(db: &TestDb) -> Self {
        let schema = db.schema.clone();
        for ddl in [
            format!(
                "CREATE TABLE {schema}.owners (aggregate_type TEXT, aggregate_id TEXT, \
                 owner TEXT NOT NULL, last_sequence BIGINT NOT NULL, \
                 PRIMARY KEY (aggregate_type, aggregate_id))"
            ),
            format!(
                "CREATE TABLE {schema}.per_owner (owner TEXT PRIMARY KEY, \
                 cents BIGINT NOT NULL, events BIGINT NOT NULL)"
            ),
        ] {
            sqlx::query(&ddl).execute(&db.pool).await.expect("create");
        }
        PerOwner { schema }
    }

    async fn view(&self, db: &TestDb) -> BTreeMap<String, (i64, i64)> {
        sqlx::query(&format!(
            "SELECT owner, cents, events FROM {}.per_owner",
            self.schema
        ))
        .fetch_all(&db.pool)
        .await
        .expect("read per_owner")
        .into_iter()
        .map(|r| (r.get::<String, _>(0), (r.get(1), r.get(2))))
        .collect()
    }

    async fn money_events(&self, db: &TestDb) -> i64 {
        self.view(db).await.values().map(|(_, events)| events).sum()
    }
}

impl PgProjection<OwnerEvent> for PerOwner {
    fn name(&self) -> &str {
        "per_owner"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<OwnerEvent>,
    ) -> Result<(), Error> {
        let schema = &self.schema;
        let sequence = i64::try_from(envelope.sequence).expect("sequence fits");
        let cents = match &envelope.event {
            OwnerEvent::Account(OwnedAccountEvent::Opened(OpenedEvent { owner }))
            | OwnerEvent::Card(CardEvent::Issued(IssuedEvent { owner })) => {
                sqlx::query(&format!(
                    "INSERT INTO {schema}.owners (aggregate_type, aggregate_id, owner, last_sequence)
                     VALUES ($1, $2, $3, $4)"
                ))
                .bind(&envelope.aggregate_type)
                .bind(&envelope.aggregate_id)
                .bind(owner)
                .bind(sequence)
                .execute(&mut *tx)
                .await
                .map_err(|e| Error::handler("per_owner", e))?;
                return Ok(());
            }
            OwnerEvent::Account(OwnedAccountEvent::Deposited(e)) => e.cents,
            OwnerEvent::Card(CardEvent::Charged(e)) => -e.cents,
        };
        let owner: Option<String> = sqlx::query_scalar(&format!(
            "UPDATE {schema}.owners SET last_sequence = $3
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND last_sequence = $3 - 1
             RETURNING owner"
        ))
        .bind(&envelope.aggregate_type)
        .bind(&envelope.aggregate_id)
        .bind(sequence)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| Error::handler("per_owner", e))?;
        let Some(owner) = owner else {
            return Err(Error::handler(
                "per_owner",
                format!(
                    "{} `{}` event {sequence} is not the next one",
                    envelope.aggregate_type, envelope.aggregate_id
                ),
            ));
        };
        sqlx::query(&format!(
            "INSERT INTO {schema}.per_owner AS p (owner, cents, events) VALUES ($1, $2, 1)
             ON CONFLICT (owner) DO UPDATE SET cents = p.cents + EXCLUDED.cents, events = p.events + 1"
        ))
        .bind(owner)
        .bind(cents)
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::handler("per_owner", e))?;
        Ok(())
    }
}

/// The view folded from the store (every event of the set, decoded by aggregate type).
async fn fold(db: &TestDb) -> BTreeMap<String, (i64, i64)> {
    let mut owners: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut view: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = db.store.read_all(after, 1000).await.expect("read all");
        let Some(last) = page.last() else { break };
        after = last.position;
        for raw in page {
            if !OwnerEvent::aggregate_types().contains(&raw.aggregate_type.as_str()) {
                continue;
            }
            let envelope = raw.decode::<OwnerEvent>().expect("decode");
            let stream = (envelope.aggregate_type, envelope.aggregate_id);
            let cents = match envelope.event {
                OwnerEvent::Account(OwnedAccountEvent::Opened(OpenedEvent { owner }))
                | OwnerEvent::Card(CardEvent::Issued(IssuedEvent { owner })) => {
                    owners.insert(stream, owner);
                    continue;
                }
                OwnerEvent::Account(OwnedAccountEvent::Deposited(e)) => e.cents,
                OwnerEvent::Card(CardEvent::Charged(e)) => -e.cents,
            };
            let entry = view.entry(owners[&stream].clone()).or_default();
            entry.0 += cents;
            entry.1 += 1;
        }
    }
    view
}

fn set_consumer(naming: &TopicNaming, group: &str) -> KafkaConsumer {
    configured_set(KafkaConsumer::new(brokers(), group), naming)
}

/// A projection's consumer: group `<prefix>.<checkpoint key>`.
fn set_projection_consumer(naming: &TopicNaming, prefix: &str) -> KafkaConsumer {
    configured_set(KafkaConsumer::for_projection(brokers()), naming)
        .with_group_prefix(format!("{prefix}."))
}

fn configured_set(consumer: KafkaConsumer, naming: &TopicNaming) -> KafkaConsumer {
    consumer
        .with_topic_naming(naming.clone())
        .with_topic_settings(topic_settings())
        .subscribe_set::<OwnerEvent>()
        .with_retry(
            thalo_kafka::RetryPolicy::new(3)
                .with_initial_backoff(Duration::from_millis(20))
                .with_max_backoff(Duration::from_millis(200)),
        )
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .with_batch_size(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_across_two_topics_is_exact_after_a_consumer_crash() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, _) = naming();
    let view = PerOwner::create(&db).await;
    let meta = Metadata::default();

    // Three owners, each with two accounts and a card; 10 money events per aggregate,
    // appended in rounds so that the types interleave in the global log.
    let owners = ["ada", "bo", "cy"];
    let per_aggregate = 10_i64;
    for owner in owners {
        for i in 0..2 {
            db.store
                .append::<OwnedAccount>(
                    &format!("{owner}-acc-{i}"),
                    0,
                    vec![OpenedEvent {
                        owner: owner.into(),
                    }
                    .into()],
                    &meta,
                )
                .await
                .expect("open");
        }
        db.store
            .append::<Card>(
                &format!("{owner}-card"),
                0,
                vec![IssuedEvent {
                    owner: owner.into(),
                }
                .into()],
                &meta,
            )
            .await
            .expect("issue");
    }
    for round in 0..per_aggregate {
        let version = round as u64 + 1;
        for owner in owners {
            for i in 0..2 {
                db.store
                    .append::<OwnedAccount>(
                        &format!("{owner}-acc-{i}"),
                        version,
                        vec![DepositedEvent { cents: 100 + round }.into()],
                        &meta,
                    )
                    .await
                    .expect("deposit");
            }
            db.store
                .append::<Card>(
                    &format!("{owner}-card"),
                    version,
                    vec![ChargedEvent { cents: round + 1 }.into()],
                    &meta,
                )
                .await
                .expect("charge");
        }
    }
    let aggregates = owners.len() as i64 * 3;
    let money = aggregates * per_aggregate;
    let total = (aggregates + money) as u64;

    // Publish everything to the two topics first.
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
    let topics = set_consumer(&naming, "any").topics();
    assert_eq!(
        topics,
        [naming.topic("ms_account"), naming.topic("ms_card")],
        "one topic per aggregate type of the set"
    );

    // Consumer 1 never commits offsets on its own and crashes (its task is aborted)
    // halfway: Kafka will deliver everything again.
    let prefix = random_name("per_owner");
    let never = CancellationToken::new();
    let first_consumer =
        set_projection_consumer(&naming, &prefix).with_commit_interval(Duration::from_secs(3600));
    // Its live count of applied events (each batch counted once committed): every open
    // and issue plus half the money events, at least, is past halfway on money.
    let first_handle = first_consumer.handle();
    let first =
        tokio::spawn(first_consumer.run_projection(db.store.clone(), view.clone(), never.clone()));
    eventually(
        Duration::from_secs(60),
        "consumer 1 to apply half",
        || async { first_handle.stats().handled >= (aggregates + money / 2) as u64 },
    )
    .await;
    first.abort();
    let _ = first.await;
    let after_crash = view.money_events(&db).await;
    assert!(after_crash >= money / 2);

    // Consumer 2, same group: the redelivered events consumer 1 applied are skipped by
    // the per-stream checkpoints, the rest is applied once.
    let stop = CancellationToken::new();
    let second = tokio::spawn(
        set_projection_consumer(&naming, &prefix)
            .with_commit_interval(Duration::from_millis(200))
            .run_projection(db.store.clone(), view.clone(), stop.clone()),
    );
    // Its checkpoints show every stored event of the set: the view is complete.
    let stored = db
        .store
        .wait_until_caught_up(
            &view,
            OwnerEvent::aggregate_types(),
            Duration::from_secs(60),
        )
        .await
        .expect("consumer 2 applies every stored event");
    assert_eq!(stored, total);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let stats = second.await.expect("consumer task").expect("consumer");
    assert_eq!(stats.handled + stats.duplicates, total, "{stats:?}");
    assert!(
        stats.duplicates >= after_crash as u64,
        "{stats:?}: what consumer 1 applied was skipped"
    );
    assert_eq!(
        (stats.dead_lettered, stats.parked, stats.held),
        (0, 0, 0),
        "{stats:?}"
    );

    // The view is the fold of the store: nothing lost, nothing applied twice.
    let expected = fold(&db).await;
    assert_eq!(view.view(&db).await, expected);
    assert_eq!(expected.len(), owners.len());
    // Per owner: 2 accounts x sum(100 + r) minus sum(r + 1), r in 0..10; 30 events.
    assert_eq!(expected["ada"], (2 * (1000 + 45) - 55, 30));
    let linked: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.owners WHERE last_sequence = $1",
        db.schema
    ))
    .bind(per_aggregate + 1)
    .fetch_one(&db.pool)
    .await
    .expect("count owners");
    assert_eq!(
        linked, aggregates,
        "every stream applied to its last event, in order"
    );
    db.drop_schema().await;
}

/// Records what it handled: (aggregate type, aggregate id, event).
#[derive(Clone, Default)]
struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<(String, String, OwnerEvent)>>>);

impl thalo::EventHandler<OwnerEvent> for Recorder {
    async fn handle(&self, envelope: &EventEnvelope<OwnerEvent>) -> Result<(), Error> {
        self.0.lock().unwrap().push((
            envelope.aggregate_type.clone(),
            envelope.aggregate_id.clone(),
            envelope.event.clone(),
        ));
        Ok(())
    }
}

/// A message on one of the set's topics whose aggregate type is not in the set cannot be
/// decoded: it is dead-lettered (reason `decode`) like any undecodable message, and the
/// set's events on both topics are decoded into the right variants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_aggregate_type_on_a_set_topic_is_dead_lettered() {
    let brokers = require_kafka().await;
    init_tracing();
    let (naming, _) = naming();
    let (accounts, cards) = (naming.topic("ms_account"), naming.topic("ms_card"));
    let dlq = format!("{accounts}.dlq");
    let one_partition = topic_settings().with_partitions(1);
    thalo_kafka::ensure_topics(
        &brokers,
        &[accounts.clone(), cards.clone(), dlq.clone()],
        &one_partition,
    )
    .await
    .expect("topics");

    let raw = |aggregate_type: &str, id: &str| EventEnvelope {
        id: uuid::Uuid::new_v4(),
        aggregate_type: aggregate_type.into(),
        aggregate_id: id.into(),
        sequence: 1,
        position: 1,
        timestamp: chrono::Utc::now(),
        metadata: Metadata::default(),
        event: thalo::RawEvent {
            event_type: "Opened".into(),
            version: 1,
            payload: r#"{"owner":"ada"}"#.into(),
        },
    };
    let producer = producer();
    for (topic, e) in [
        (&accounts, raw("intruder", "x-1")),
        (&accounts, raw("ms_account", "a-1")),
        (&cards, raw("ms_card", "c-1")),
    ] {
        let headers = thalo_kafka::encode_headers(&e);
        produce_raw(&producer, topic, &e.aggregate_id, &e.event.payload, headers).await;
    }

    let handler = Recorder::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        set_consumer(&naming, &random_name("recorder"))
            .with_topic_settings(one_partition)
            .run(handler.clone(), shutdown.clone()),
    );
    let dead = read_topic(&dlq, 1, Duration::from_secs(60)).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(
        header(&dead[0], "thalo_dlq_reason").as_deref(),
        Some("decode")
    );
    let error = header(&dead[0], "thalo_dlq_error").unwrap();
    assert!(
        error.contains("aggregate type `intruder` (event `Opened`) is not in OwnerEvent"),
        "{error}"
    );
    eventually(Duration::from_secs(30), "both events handled", || async {
        handler.0.lock().unwrap().len() == 2
    })
    .await;
    shutdown.cancel();
    let stats = task.await.expect("consumer task").expect("consumer");
    assert_eq!((stats.handled, stats.dead_lettered), (2, 1), "{stats:?}");
    let mut handled = handler.0.lock().unwrap().clone();
    handled.sort_by(|a, b| a.1.cmp(&b.1));
    let owner = || "ada".to_owned();
    assert!(
        matches!(
            &handled[..],
            [
                (t1, a, OwnerEvent::Account(OwnedAccountEvent::Opened(OpenedEvent { owner: o1 }))),
                (t2, c, OwnerEvent::Card(CardEvent::Issued(IssuedEvent { owner: o2 }))),
            ] if t1 == "ms_account" && a == "a-1" && t2 == "ms_card" && c == "c-1"
                && *o1 == owner() && *o2 == owner()
        ),
        "{handled:?}"
    );
}
