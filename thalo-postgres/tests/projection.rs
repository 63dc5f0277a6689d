//! Projections with exactly-once effects: `apply_exactly_once` and `PgSubscription`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{deposits, new_id, Account, AccountEvent, Counts, Note, WrittenEvent};
use sqlx::PgConnection;
use thalo::{CheckpointStore, Error, EventEnvelope, EventStore, Metadata};
use thalo_postgres::{Applied, PgProjection, PgSubscription};

/// Sums deposits per account into `<schema>.balances`; fails on the `fail_on`-th call
/// (counting from 1) when set.
struct Balances {
    upsert: String,
    calls: AtomicUsize,
    fail_on: Option<usize>,
}

impl Balances {
    async fn new(db: &common::TestDb) -> Self {
        let table = db.table("balances");
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (account TEXT PRIMARY KEY, cents BIGINT NOT NULL, events BIGINT NOT NULL)"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
        Balances {
            upsert: format!(
                "INSERT INTO {table} AS b (account, cents, events) VALUES ($1, $2, 1)
                 ON CONFLICT (account) DO UPDATE SET cents = b.cents + EXCLUDED.cents, events = b.events + 1"
            ),
            calls: AtomicUsize::new(0),
            fail_on: None,
        }
    }

    fn failing_on(mut self, call: usize) -> Self {
        self.fail_on = Some(call);
        self
    }
}

#[derive(Debug, thiserror::Error)]
#[error("simulated crash")]
struct Crash;

impl PgProjection<AccountEvent> for Balances {
    fn name(&self) -> &str {
        "balances"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_on == Some(call) {
            return Err(Error::handler("balances", Crash));
        }
        let AccountEvent::Deposited(deposit) = &envelope.event;
        sqlx::query(&self.upsert)
            .bind(&envelope.aggregate_id)
            .bind(deposit.amount)
            .execute(tx)
            .await
            .map_err(|e| Error::store("updating balances", e))?;
        Ok(())
    }
}

async fn balances(db: &common::TestDb) -> Vec<(String, i64, i64)> {
    sqlx::query_as(&format!(
        "SELECT account, cents, events FROM {} ORDER BY account",
        db.table("balances")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Appends deposits to three accounts and a note; returns the expected balances.
async fn seed(db: &common::TestDb) -> Vec<(String, i64, i64)> {
    let mut expected = Vec::new();
    for (i, amounts) in [vec![1, 2, 3], vec![10], vec![100, 200, 300, 400]]
        .into_iter()
        .enumerate()
    {
        let id = format!("acc-{i}");
        let stored = db
            .store
            .append::<Account>(&id, 0, deposits(amounts.clone()), &Metadata::default())
            .await
            .unwrap();
        expected.push((id, amounts.iter().sum(), stored.len() as i64));
        db.store
            .append::<Note>(
                &format!("note-{i}"),
                0,
                vec![WrittenEvent {
                    text: "ignored".into(),
                }
                .into()],
                &Metadata::default(),
            )
            .await
            .unwrap();
    }
    // Tests run in parallel on one cluster, and an open transaction of another test holds
    // the read horizon back for a moment: wait until all 11 events are readable, so that
    // a catch-up sees them in one go.
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.store.read_all(0, 100).await.unwrap().len() < 11 {
        assert!(
            Instant::now() < deadline,
            "the seeded events never became readable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    expected
}

#[tokio::test]
async fn a_subscription_applies_every_event_once_and_checkpoints_with_it() {
    let db = common::store().await;
    let expected = seed(&db).await;
    let subscription = PgSubscription::new::<Account>(db.store.clone(), Balances::new(&db).await)
        .with_batch_size(3);

    let applied = subscription.catch_up().await.unwrap();
    assert_eq!(
        applied,
        Counts {
            applied: 8,
            duplicates: 0,
            held: 0,
        }
    );
    assert_eq!(balances(&db).await, expected);
    let last = common::read_everything(&db.store)
        .await
        .last()
        .unwrap()
        .position;
    assert_eq!(
        db.store.load_checkpoint("balances").await.unwrap(),
        Some(last)
    );

    // Nothing new: nothing applied.
    assert_eq!(subscription.catch_up().await.unwrap(), Applied::default());
    assert_eq!(balances(&db).await, expected);
}

#[tokio::test]
async fn a_crash_mid_batch_rolls_back_read_model_and_checkpoint() {
    let db = common::store().await;
    let expected = seed(&db).await;

    // The 5th event fails: the first four were handled in the same transaction.
    let crashing =
        PgSubscription::new::<Account>(db.store.clone(), Balances::new(&db).await.failing_on(5));
    let err = crashing.catch_up().await.expect_err("simulated crash");
    assert!(
        matches!(err, Error::Handler { ref handler, .. } if handler == "balances"),
        "{err:?}"
    );
    assert_eq!(
        balances(&db).await,
        [],
        "the read model change was rolled back"
    );
    assert_eq!(db.store.load_checkpoint("balances").await.unwrap(), None);
    let stream_checkpoints: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE sequence > 0",
        db.table("stream_checkpoints")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stream_checkpoints, 0);

    // The restarted projection produces the exact read model.
    let restarted = PgSubscription::new::<Account>(db.store.clone(), Balances::new(&db).await);
    assert_eq!(restarted.catch_up().await.unwrap().applied, 8);
    assert_eq!(balances(&db).await, expected);
}

#[tokio::test]
async fn a_crash_in_a_later_batch_keeps_earlier_batches() {
    let db = common::store().await;
    let expected = seed(&db).await;
    // Batches of 2 log entries: the 4th handled event is in the third batch.
    let crashing =
        PgSubscription::new::<Account>(db.store.clone(), Balances::new(&db).await.failing_on(4))
            .with_batch_size(2);
    crashing.catch_up().await.expect_err("simulated crash");
    let partial = balances(&db).await;
    let applied: i64 = partial.iter().map(|b| b.2).sum();
    assert_eq!(applied, 3, "{partial:?}");

    let restarted = PgSubscription::new::<Account>(db.store.clone(), Balances::new(&db).await)
        .with_batch_size(2);
    let rest = restarted.catch_up().await.unwrap();
    assert_eq!(rest.applied, 5);
    assert_eq!(balances(&db).await, expected);
}

#[tokio::test]
async fn duplicate_and_overlapping_deliveries_are_skipped() {
    let db = common::store().await;
    let projection = Balances::new(&db).await;
    let id = new_id();
    let stored = db
        .store
        .append::<Account>(&id, 0, deposits(1..=8), &Metadata::default())
        .await
        .unwrap();

    let first = db
        .store
        .apply_exactly_once(&projection, &stored[..5])
        .await
        .unwrap();
    assert_eq!(
        first,
        Counts {
            applied: 5,
            duplicates: 0,
            held: 0,
        }
    );
    // Redelivery of the same batch.
    let again = db
        .store
        .apply_exactly_once(&projection, &stored[..5])
        .await
        .unwrap();
    assert_eq!(
        again,
        Counts {
            applied: 0,
            duplicates: 5,
            held: 0,
        }
    );
    // A batch overlapping what was applied, with a duplicate inside it.
    let overlapping: Vec<_> = stored[3..].iter().chain(&stored[7..]).cloned().collect();
    let rest = db
        .store
        .apply_exactly_once(&projection, &overlapping)
        .await
        .unwrap();
    assert_eq!(
        rest,
        Counts {
            applied: 3,
            duplicates: 3,
            held: 0,
        }
    );
    assert_eq!(balances(&db).await, [(id.clone(), 36, 8)]);
    assert_eq!(projection.calls.load(Ordering::SeqCst), 8);

    // Empty batches are fine.
    assert_eq!(
        db.store
            .apply_exactly_once::<AccountEvent, _>(&projection, &[])
            .await
            .unwrap(),
        Applied::default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appliers_of_one_batch_apply_it_once() {
    let db = common::store_with(10, |b| b).await;
    let projection = Arc::new(Balances::new(&db).await);
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.extend(
            db.store
                .append::<Account>(
                    &format!("acc-{i}"),
                    0,
                    deposits([1, 2, 3]),
                    &Metadata::default(),
                )
                .await
                .unwrap(),
        );
    }
    let batch = Arc::new(batch);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, projection, batch) = (db.store.clone(), projection.clone(), batch.clone());
            tokio::spawn(async move { store.apply_exactly_once(&projection, &batch).await })
        })
        .collect();
    let mut total = Applied::default();
    for task in tasks {
        total += task.await.unwrap().unwrap();
    }
    assert_eq!(
        total,
        Counts {
            applied: 15,
            duplicates: 45,
            held: 0,
        }
    );
    let rows = balances(&db).await;
    assert_eq!(rows.len(), 5);
    assert!(
        rows.iter()
            .all(|(_, cents, events)| (*cents, *events) == (6, 3)),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_follows_new_events_and_stops_on_shutdown() {
    let db = common::store().await;
    let subscription = PgSubscription::new::<Account>(db.store.clone(), Balances::new(&db).await)
        .with_poll_interval(Duration::from_secs(30));
    let progress = subscription.progress();
    let stop = thalo::Shutdown::new();
    let runner = tokio::spawn(subscription.run(stop.clone()));

    let id = new_id();
    let mut stored = Vec::new();
    for (version, amount) in [5, 6, 7].into_iter().enumerate() {
        stored.extend(
            db.store
                .append::<Account>(
                    &id,
                    version as u64,
                    deposits([amount]),
                    &Metadata::default(),
                )
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The idle timeout is 30 s: only notifications can make this quick.
    progress
        .wait_until_projected(&stored, Duration::from_secs(10))
        .await
        .expect("the subscription follows new events");
    assert_eq!(balances(&db).await, [(id.clone(), 18, 3)]);
    let report = progress.report();
    assert_eq!(report.handled, 3, "{report:?}");
    assert!(report.position >= stored[2].position, "{report:?}");

    stop.trigger();
    let projection = tokio::time::timeout(Duration::from_secs(5), runner)
        .await
        .expect("stops on shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(projection.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_core_subscription_runs_on_the_postgres_store_too() {
    struct Count(AtomicUsize);
    impl thalo::EventHandler<AccountEvent> for Count {
        async fn handle(&self, _: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    impl thalo::Projection<AccountEvent> for Count {
        fn name(&self) -> &str {
            "count"
        }
    }
    let db = common::store().await;
    seed(&db).await;
    let mut subscription =
        thalo::Subscription::new::<Account>(db.store.clone(), Count(AtomicUsize::new(0)));
    assert_eq!(subscription.catch_up().await.unwrap(), 8);
    assert!(db.store.load_checkpoint("count").await.unwrap().is_some());
    assert_eq!(db.store.read_all(0, 100).await.unwrap().len(), 11);
}

/// Sums deposits per account with one multi-row upsert per batch, and records the
/// sequences of every batch it is handed.
struct BatchBalances {
    upsert: String,
    batches: std::sync::Mutex<Vec<Vec<u64>>>,
    fail: std::sync::atomic::AtomicBool,
}

impl PgProjection<AccountEvent> for BatchBalances {
    fn name(&self) -> &str {
        "batch_balances"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        self.handle_batch(tx, &[envelope]).await
    }

    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        envelopes: &[&EventEnvelope<AccountEvent>],
    ) -> Result<(), Error> {
        self.batches
            .lock()
            .unwrap()
            .push(envelopes.iter().map(|e| e.sequence).collect());
        let mut sums: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
        for envelope in envelopes {
            let AccountEvent::Deposited(deposit) = &envelope.event;
            let sum = sums.entry(envelope.aggregate_id.as_str()).or_default();
            sum.0 += deposit.amount;
            sum.1 += 1;
        }
        let accounts: Vec<&str> = sums.keys().copied().collect();
        let cents: Vec<i64> = sums.values().map(|s| s.0).collect();
        let events: Vec<i64> = sums.values().map(|s| s.1).collect();
        sqlx::query(&self.upsert)
            .bind(&accounts)
            .bind(&cents)
            .bind(&events)
            .execute(tx)
            .await
            .map_err(|e| Error::store("updating balances", e))?;
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::handler("batch_balances", Crash));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_batch_projection_gets_only_new_events_in_one_call() {
    let db = common::store().await;
    let table = db.table("batch_balances");
    sqlx::query(&format!(
        "CREATE TABLE {table} (account TEXT PRIMARY KEY, cents BIGINT NOT NULL, events BIGINT NOT NULL)"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let projection = BatchBalances {
        upsert: format!(
            "INSERT INTO {table} AS b (account, cents, events)
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[])
             ON CONFLICT (account) DO UPDATE
             SET cents = b.cents + EXCLUDED.cents, events = b.events + EXCLUDED.events"
        ),
        batches: Default::default(),
        fail: Default::default(),
    };
    let (a, b) = (new_id(), new_id());
    let stored_a = db
        .store
        .append::<Account>(&a, 0, deposits(1..=6), &Metadata::default())
        .await
        .unwrap();
    let stored_b = db
        .store
        .append::<Account>(&b, 0, deposits([100, 200]), &Metadata::default())
        .await
        .unwrap();

    let first: Vec<_> = stored_a[..3]
        .iter()
        .chain(&stored_b[..1])
        .cloned()
        .collect();
    let applied = db
        .store
        .apply_exactly_once(&projection, &first)
        .await
        .unwrap();
    assert_eq!(applied.applied, 4);

    // Overlapping redelivery with a duplicate inside: only the new events, in order, in
    // one call.
    let second: Vec<_> = stored_a[2..]
        .iter()
        .chain(&stored_b)
        .chain(&stored_a[5..])
        .cloned()
        .collect();
    let applied = db
        .store
        .apply_exactly_once(&projection, &second)
        .await
        .unwrap();
    assert_eq!((applied.applied, applied.duplicates), (4, 3));
    assert_eq!(
        *projection.batches.lock().unwrap(),
        [vec![1, 2, 3, 1], vec![4, 5, 6, 2]]
    );

    // A failing batch rolls back its upsert and its checkpoints.
    let c = new_id();
    let stored_c = db
        .store
        .append::<Account>(&c, 0, deposits([5]), &Metadata::default())
        .await
        .unwrap();
    projection.fail.store(true, Ordering::SeqCst);
    let err = db
        .store
        .apply_exactly_once(&projection, &stored_c)
        .await
        .expect_err("the batch fails");
    assert!(matches!(err, Error::Handler { .. }), "{err}");
    projection.fail.store(false, Ordering::SeqCst);
    let applied = db
        .store
        .apply_exactly_once(&projection, &stored_c)
        .await
        .unwrap();
    assert_eq!(applied.applied, 1, "nothing of the failed batch was kept");

    let mut expected = vec![(a, 21, 6), (b, 300, 2), (c, 5, 1)];
    expected.sort();
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT account, cents, events FROM {table} ORDER BY account"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows, expected);
}

/// Records the `search_path` its transaction sees, and writes to a table named with
/// `SchemaName::qualify`.
struct SearchPath {
    insert: String,
    seen: std::sync::Mutex<Vec<String>>,
}

impl PgProjection<AccountEvent> for SearchPath {
    fn name(&self) -> &str {
        "search_path"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        let path: String = sqlx::query_scalar("SHOW search_path")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| Error::store("reading search_path", e))?;
        self.seen.lock().unwrap().push(path);
        sqlx::query(&self.insert)
            .bind(&envelope.aggregate_id)
            .bind(i64::try_from(envelope.sequence).unwrap())
            .execute(tx)
            .await
            .map_err(|e| Error::store("recording", e))?;
        Ok(())
    }
}

/// The documented convention (`PgProjection`, "Where read-model tables go"): Thalo does
/// not change the `search_path` of a projection's transaction, so an unqualified name
/// never resolves into the store's schema (where `events`, `outbox`, `checkpoints`, ...
/// live); read-model tables are named qualified, in the store's schema.
#[tokio::test]
async fn a_projection_transaction_keeps_the_pools_search_path() {
    let db = common::store().await;
    let table = db.store.schema().qualify("search_path_seen");
    sqlx::query(&format!(
        "CREATE TABLE {table} (account TEXT NOT NULL, sequence BIGINT NOT NULL)"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let pool_path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!pool_path.contains(&db.schema), "{pool_path}");
    let projection = SearchPath {
        insert: format!("INSERT INTO {table} (account, sequence) VALUES ($1, $2)"),
        seen: std::sync::Mutex::new(Vec::new()),
    };

    // Both ways a projection is run: a batch from a consumer, and a subscription.
    let id = new_id();
    let stored = db
        .store
        .append::<Account>(&id, 0, deposits([1, 2]), &Metadata::default())
        .await
        .unwrap();
    let applied = db
        .store
        .apply_exactly_once(&projection, &stored[..1])
        .await
        .unwrap();
    assert_eq!(applied.applied, 1);
    let subscription = PgSubscription::new::<Account>(db.store.clone(), projection);
    let progress = subscription.progress();
    let stop = thalo::Shutdown::new();
    let running = tokio::spawn(subscription.run(stop.clone()));
    progress
        .wait_until_projected(&stored, Duration::from_secs(30))
        .await
        .expect("the subscription applies the second event");
    stop.trigger();
    let projection = running.await.unwrap().unwrap();

    let seen = projection.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [pool_path.clone(), pool_path],
        "the pool's search_path"
    );
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT account, sequence FROM {table} ORDER BY sequence"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [(id.clone(), 1), (id, 2)],
        "written to the qualified table"
    );
}
