//! Projection rebuilds without downtime: a new version is built beside the live one,
//! takes over once it has caught up, and no read fails during the swap.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{deposits, new_id, Account, AccountEvent, Counts, TestDb};
use sqlx::PgConnection;
use thalo::{CheckpointStore, Error, EventEnvelope, EventStore, Metadata, Shutdown};
use thalo_postgres::{
    checkpoint_key, PgEventStore, PgProjection, PgSubscription, ReadModelTable, VersionState,
};

/// Balances, version 1: `(account, cents)`; version 2 also counts deposits, a column
/// version 1 does not have.
struct Balances {
    table: ReadModelTable,
    upsert: String,
}

impl Balances {
    async fn new(db: &TestDb, version: u32) -> Self {
        let table = ReadModelTable::new(db.store.schema(), "balances", version).unwrap();
        let (columns, upsert) = if version == 1 {
            (
                "account TEXT PRIMARY KEY, cents BIGINT NOT NULL",
                format!(
                    "INSERT INTO {t} AS b (account, cents) VALUES ($1, $2)
                     ON CONFLICT (account) DO UPDATE SET cents = b.cents + EXCLUDED.cents",
                    t = table.table()
                ),
            )
        } else {
            (
                "account TEXT PRIMARY KEY, cents BIGINT NOT NULL, deposits BIGINT NOT NULL",
                format!(
                    "INSERT INTO {t} AS b (account, cents, deposits) VALUES ($1, $2, 1)
                     ON CONFLICT (account) DO UPDATE
                     SET cents = b.cents + EXCLUDED.cents, deposits = b.deposits + 1",
                    t = table.table()
                ),
            )
        };
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} ({columns})",
            table.table()
        ))
        .execute(&db.pool)
        .await
        .unwrap();
        Balances { table, upsert }
    }
}

impl PgProjection<AccountEvent> for Balances {
    fn name(&self) -> &str {
        "balances"
    }

    fn version(&self) -> u32 {
        self.table.version()
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        let AccountEvent::Deposited(deposited) = &envelope.event;
        sqlx::query(&self.upsert)
            .bind(&envelope.aggregate_id)
            .bind(deposited.amount)
            .execute(tx)
            .await
            .map_err(|e| Error::store("updating balances", e))?;
        Ok(())
    }
}

/// What every account should hold: `(cents, deposits)` per account.
type Expected = Arc<Mutex<BTreeMap<String, (i64, i64)>>>;

async fn deposit(store: &PgEventStore, expected: &Expected, id: &str, amounts: &[i64]) {
    let id = id.to_owned();
    let version = store.load::<Account>(&id).await.unwrap().version;
    store
        .append::<Account>(
            &id,
            version,
            deposits(amounts.iter().copied()),
            &Metadata::default(),
        )
        .await
        .unwrap();
    let mut expected = expected.lock().unwrap();
    let entry = expected.entry(id).or_default();
    entry.0 += amounts.iter().sum::<i64>();
    entry.1 += amounts.len() as i64;
}

async fn rows_v2(db: &TestDb, table: &str) -> BTreeMap<String, (i64, i64)> {
    sqlx::query_as::<_, (String, i64, i64)>(&format!(
        "SELECT account, cents, deposits FROM {table}"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(account, cents, deposits)| (account, (cents, deposits)))
    .collect()
}

/// Polls `check` until it holds: for the versions' states (which version is live), not
/// for a read model's rows (wait on its checkpoints for those).
async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_version_is_built_beside_the_live_one_and_takes_over_without_a_failed_read() {
    let db = common::store_with(20, |b| b).await;
    let store = db.store.clone();
    let expected: Expected = Arc::default();
    let accounts: Vec<String> = (0..20).map(|_| new_id()).collect();
    // History before either version runs: 20 accounts, 1,000 events.
    for account in &accounts {
        for _ in 0..5 {
            deposit(&store, &expected, account, &[1; 10]).await;
        }
    }

    // Version 1 goes live at once (nothing else is) and catches up.
    let v1 = Balances::new(&db, 1).await;
    let v1_table = v1.table.clone();
    let shutdown = Shutdown::new();
    let v1_task = tokio::spawn(
        PgSubscription::new::<Account>(store.clone(), v1)
            .with_read_model(vec![v1_table.clone()])
            .with_batch_size(100)
            .run(shutdown.clone()),
    );
    wait_for("version 1 to be live", Duration::from_secs(20), || async {
        store.live_version("balances").await.unwrap() == Some(1)
    })
    .await;

    // Writers keep appending; readers keep reading the view.
    let writing = Arc::new(AtomicBool::new(true));
    let writers: Vec<_> = accounts
        .chunks(5)
        .map(|chunk| {
            let (store, expected, writing) = (store.clone(), expected.clone(), writing.clone());
            let chunk = chunk.to_vec();
            tokio::spawn(async move {
                let mut n = 0usize;
                while writing.load(Ordering::SeqCst) {
                    deposit(
                        &store,
                        &expected,
                        &chunk[n % chunk.len()],
                        &[n as i64 % 7 + 1],
                    )
                    .await;
                    n += 1;
                }
            })
        })
        .collect();
    let reading = Arc::new(AtomicBool::new(true));
    let reads = Arc::new(AtomicUsize::new(0));
    let failed_reads = Arc::new(Mutex::new(Vec::<String>::new()));
    // The columns the view had, as readers saw them: 2 (version 1), then 3 (version 2).
    let shapes = Arc::new(Mutex::new(Vec::<usize>::new()));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (pool, view) = (db.pool.clone(), v1_table.view().to_owned());
            let (reading, reads, failed, shapes) = (
                reading.clone(),
                reads.clone(),
                failed_reads.clone(),
                shapes.clone(),
            );
            tokio::spawn(async move {
                while reading.load(Ordering::SeqCst) {
                    // What an application reads: named columns, through a prepared
                    // statement that every connection caches.
                    let sum = sqlx::query_scalar::<_, Option<i64>>(&format!(
                        "SELECT sum(cents)::int8 FROM (SELECT account, cents FROM {view}) b"
                    ))
                    .fetch_one(&pool)
                    .await;
                    if let Err(err) = sum {
                        failed
                            .lock()
                            .unwrap()
                            .push(format!("application read: {err}"));
                    }
                    // Which version answered: the simple query protocol, which plans and runs
                    // at once (a prepared `SELECT *` fails when the view's columns change
                    // between its parse and its execution).
                    let row = sqlx::raw_sql(&format!("SELECT * FROM {view} LIMIT 1"))
                        .fetch_all(&pool)
                        .await;
                    match row.map(|rows| rows.into_iter().next()) {
                        Ok(Some(row)) => {
                            use sqlx::Row;
                            let mut shapes = shapes.lock().unwrap();
                            if shapes.last() != Some(&row.len()) {
                                shapes.push(row.len());
                            }
                        }
                        Ok(None) => {}
                        Err(err) => failed.lock().unwrap().push(format!("shape probe: {err}")),
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // Version 2 is built from position 0 while version 1 serves, then takes over.
    let v2 = Balances::new(&db, 2).await;
    let v2_table = v2.table.clone();
    let v2_task = tokio::spawn(
        PgSubscription::new::<Account>(store.clone(), v2)
            .with_read_model(vec![v2_table.clone()])
            .with_batch_size(100)
            .run(shutdown.clone()),
    );
    wait_for("version 2 to be live", Duration::from_secs(60), || async {
        store.live_version("balances").await.unwrap() == Some(2)
    })
    .await;
    let reads_at_swap = reads.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    writing.store(false, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }

    // Version 2 keeps applying new events: once its checkpoints show every stored event,
    // it equals the fold of the store.
    let want = expected.lock().unwrap().clone();
    let mut stored = Vec::new();
    for account in &accounts {
        stored.extend(store.read_stream::<Account>(account, 0).await.unwrap());
    }
    store
        .wait_until_projected_by_key(
            &checkpoint_key("balances", 2),
            &stored,
            Duration::from_secs(30),
        )
        .await
        .expect("version 2 applies every stored event");
    assert_eq!(
        rows_v2(&db, v2_table.table()).await,
        want,
        "version 2 is the fold of the store"
    );
    assert_eq!(
        rows_v2(&db, v2_table.view()).await,
        want,
        "the view reads version 2"
    );
    reading.store(false, Ordering::SeqCst);
    for reader in readers {
        reader.await.unwrap();
    }
    let failed = failed_reads.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "reads failed during the swap: {failed:?}"
    );
    assert!(
        reads_at_swap > 0 && reads.load(Ordering::SeqCst) > reads_at_swap,
        "readers read before and after the swap"
    );
    assert_eq!(*shapes.lock().unwrap(), [2, 3], "version 1, then version 2");

    // Version 1 is retired with its tables kept; dropping it removes them and its
    // checkpoints; the live version cannot be dropped.
    let versions = store.projection_versions("balances").await.unwrap();
    let states: Vec<(u32, VersionState)> = versions.iter().map(|v| (v.version, v.state)).collect();
    assert_eq!(
        states,
        [(1, VersionState::Retired), (2, VersionState::Live)]
    );
    assert_eq!(versions[1].views, [v2_table.view()]);
    // An old deployment that restarts catches up its version but does not take over.
    let v1_again = PgSubscription::new::<Account>(store.clone(), Balances::new(&db, 1).await)
        .with_read_model(vec![v1_table.clone()]);
    v1_again.catch_up().await.unwrap();
    assert_eq!(store.live_version("balances").await.unwrap(), Some(2));
    shutdown.trigger();
    v1_task.await.unwrap().unwrap();
    v2_task.await.unwrap().unwrap();
    assert!(store.drop_version("balances", 1).await.unwrap());
    let v1_exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(v1_table.table())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(v1_exists, None, "version 1's table is dropped");
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), None);
    assert!(store
        .load_checkpoint(&checkpoint_key("balances", 2))
        .await
        .unwrap()
        .is_some());
    let err = store.drop_version("balances", 2).await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(
        !store.drop_version("balances", 1).await.unwrap(),
        "gone already"
    );
}

/// A Kafka-fed projection is rebuilt from the store, then its consumer takes over: the
/// stream checkpoints the rebuild left make every redelivered event a duplicate and
/// every later one applied, so nothing is applied twice or skipped.
#[tokio::test]
async fn a_rebuild_from_the_store_hands_over_to_a_consumer_exactly_once() {
    let db = common::store().await;
    let store = db.store.clone();
    let expected: Expected = Arc::default();
    let (a, b) = (new_id(), new_id());
    deposit(&store, &expected, &a, &[1, 2, 3]).await;
    deposit(&store, &expected, &b, &[10, 20]).await;

    let v2 = Balances::new(&db, 2).await;
    let table = v2.table.clone();
    let rebuild =
        PgSubscription::new::<Account>(store.clone(), v2).with_read_model(vec![table.clone()]);
    assert_eq!(
        rebuild.catch_up().await.unwrap(),
        Counts {
            applied: 5,
            duplicates: 0,
            held: 0,
        }
    );
    // Nothing else was live: the rebuilt version is.
    assert_eq!(store.live_version("balances").await.unwrap(), Some(2));

    // More events arrive after the rebuild; the consumer then gets the whole topic
    // (it starts from the earliest offset), old events included.
    deposit(&store, &expected, &a, &[4]).await;
    deposit(&store, &expected, &b, &[30, 40]).await;
    let everything: Vec<EventEnvelope<AccountEvent>> = common::read_everything(&store)
        .await
        .iter()
        .map(EventEnvelope::decode)
        .collect::<Result<_, _>>()
        .unwrap();
    let projection = rebuild.projection();
    assert_eq!(
        store
            .apply_exactly_once(projection, &everything)
            .await
            .unwrap(),
        Counts {
            applied: 3,
            duplicates: 5,
            held: 0,
        }
    );
    let want = expected.lock().unwrap().clone();
    assert_eq!(rows_v2(&db, table.view()).await, want);
}

#[tokio::test]
async fn read_model_names_are_checked() {
    let db = common::store().await;
    let schema = db.store.schema();
    for bad in [
        "",
        "Balances",
        "1balances",
        "bal-ances",
        "b\"; DROP TABLE x; --",
    ] {
        let err = ReadModelTable::new(schema, bad, 1).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
    }
    assert!(ReadModelTable::new(schema, "balances", 0).is_err());
    let table = ReadModelTable::new(schema, "balances", 3).unwrap();
    assert_eq!(table.table(), format!("\"{}\".balances_v3", db.schema));
    assert_eq!(table.view(), format!("\"{}\".balances", db.schema));
    // A table of another version is refused.
    let err = db.store.promote("balances", 2, &[table]).await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
}
