//! One identity per projection: its consumer group derives from its checkpoint key
//! (name, and version from 2 on), so a renamed projection or a new version reads its
//! topics from the beginning, and the same projection resumes where its group was.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgConnection;
use thalo::{AggregateType as _, Error, EventEnvelope, EventStore, Metadata};
use thalo_kafka::{ConsumerStats, KafkaConsumer};
use thalo_postgres::{checkpoint_key, PgProjection};
use tokio_util::sync::CancellationToken;

/// Records every event it applies under its checkpoint key.
#[derive(Clone, Debug)]
struct Tally {
    name: &'static str,
    version: u32,
    schema: String,
}

impl Tally {
    fn key(&self) -> String {
        checkpoint_key(self.name, self.version).into_owned()
    }
}

impl PgProjection<AccountEvent> for Tally {
    fn name(&self) -> &str {
        self.name
    }

    fn version(&self) -> u32 {
        self.version
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        let sequence = i64::try_from(envelope.sequence).expect("sequence fits");
        sqlx::query(&format!(
            "INSERT INTO {}.tally (projection, account, sequence) VALUES ($1, $2, $3)",
            self.schema
        ))
        .bind(self.key())
        .bind(&envelope.aggregate_id)
        .bind(sequence)
        .execute(tx)
        .await
        .map_err(|e| Error::store("recording an event", e))?;
        Ok(())
    }
}

async fn tallied(db: &TestDb, key: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.tally WHERE projection = $1",
        db.schema
    ))
    .bind(key)
    .fetch_one(&db.pool)
    .await
    .expect("count")
}

/// Runs `tally` until its checkpoints show every stored event (or, when `catch_up` is
/// false, for a few seconds), then stops it gracefully (offsets committed) and returns
/// its stats.
async fn run(db: &TestDb, consumer: KafkaConsumer, tally: &Tally, catch_up: bool) -> ConsumerStats {
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run_projection(db.store.clone(), tally.clone(), stop.clone()));
    if catch_up {
        if let Err(err) = db
            .store
            .wait_until_caught_up(tally, &[Account::TYPE], Duration::from_secs(60))
            .await
        {
            panic!("`{}` did not apply the stored events: {err}", tally.key());
        }
        // Anything more would arrive now.
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else {
        // Long enough to join the group and be handed whatever is left.
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    stop.cancel();
    task.await.expect("consumer task").expect("consumer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_or_new_version_projection_reads_every_event_from_the_start() {
    require_kafka().await;
    let db = TestDb::new().await;
    let (naming, _topic) = naming();
    sqlx::query(&format!(
        "CREATE TABLE {}.tally (
            projection TEXT NOT NULL,
            account TEXT NOT NULL,
            sequence BIGINT NOT NULL,
            PRIMARY KEY (projection, account, sequence)
        )",
        db.schema
    ))
    .execute(&db.pool)
    .await
    .expect("create tally");

    // 10 events: 5 each on two accounts, published, then the relay stops.
    for id in ["acc-a", "acc-b"] {
        let events = (1..=5)
            .map(|amount| AccountEvent::Deposited(DepositedEvent { amount }))
            .collect();
        db.store
            .append::<Account>(&id.to_owned(), 0, events, &Metadata::default())
            .await
            .expect("append");
    }
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

    // Every consumer gets the same group prefix: only the projection tells groups apart.
    let prefix = random_name("identity");
    let tally = |name, version| Tally {
        name,
        version,
        schema: db.schema.clone(),
    };
    let v1 = tally("tally", 1);
    let v2 = tally("tally", 2);
    let renamed = tally("renamed", 1);
    let consumer = || projection_consumer_with_prefix(&naming, &prefix);
    assert_eq!(
        consumer().group_id(),
        "",
        "no group until a projection runs"
    );
    assert_eq!(
        consumer().projection_group_id(&v1),
        format!("{prefix}.tally")
    );
    assert_eq!(
        consumer().projection_group_id(&v2),
        format!("{prefix}.tally@v2")
    );
    assert_eq!(
        consumer().projection_group_id(&renamed),
        format!("{prefix}.renamed")
    );

    let first = run(&db, consumer(), &v1, true).await;
    assert_eq!((first.handled, first.duplicates), (10, 0), "{first:?}");

    // The same projection again: the same group, which committed its offsets on
    // shutdown, so nothing is handed over again (not even as duplicates).
    let again = run(&db, consumer(), &v1, false).await;
    assert_eq!((again.handled, again.duplicates), (0, 0), "{again:?}");

    // A new version, and a new name: a group of their own each, read from the start,
    // 10 of 10 events (in the first consumer's group, they would get 0 of 10).
    let second = run(&db, consumer(), &v2, true).await;
    assert_eq!((second.handled, second.duplicates), (10, 0), "{second:?}");
    let third = run(&db, consumer(), &renamed, true).await;
    assert_eq!((third.handled, third.duplicates), (10, 0), "{third:?}");

    for key in ["tally", "tally@v2", "renamed"] {
        assert_eq!(
            tallied(&db, key).await,
            10,
            "`{key}` applied every event once"
        );
    }
    db.drop_schema().await;
}
