//! Postgres-specific behaviour of `PgEventStore`: conflicts, joined transactions, the
//! outbox, notifications, migrations, schema names, snapshots and the global order under
//! concurrent writers.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{deposits, new_id, Account, AccountCommand};
use sqlx::postgres::PgListener;
use sqlx::Row;
use thalo::{Error, EventStore, Metadata, Repository};
use thalo_postgres::{NotifyMode, PgEventStore};

fn no_metadata() -> Metadata {
    Metadata::default()
}

/// Waits until a statement touching the test's events table is blocked on a lock.
async fn wait_until_blocked(db: &common::TestDb) {
    let pattern = format!("%\"{}\".events%", db.schema);
    for _ in 0..500 {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(&pattern)
        .fetch_one(&db.pool)
        .await
        .expect("pg_stat_activity");
        if blocked > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the second append never blocked on the first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_race_is_a_conflict_with_the_unique_violation_as_source() {
    let db = common::store().await;
    let id = new_id();

    // The first writer inserts sequence 1 and keeps its transaction open.
    let mut first = db.pool.begin().await.unwrap();
    db.store
        .append_in::<Account>(&mut first, &id, 0, deposits([1]), &no_metadata())
        .await
        .expect("first append");

    // The second writer also sees version 0, inserts sequence 1 and waits on the index.
    let second = tokio::spawn({
        let store = db.store.clone();
        let id = id.clone();
        async move {
            store
                .append::<Account>(&id, 0, deposits([2]), &no_metadata())
                .await
        }
    });
    wait_until_blocked(&db).await;
    first.commit().await.unwrap();

    let err = second.await.unwrap().expect_err("the second writer loses");
    let Error::Conflict {
        aggregate_type,
        aggregate_id,
        expected,
        actual,
        source,
    } = err
    else {
        panic!("expected a conflict, got {err:?}");
    };
    assert_eq!(
        (
            aggregate_type.as_ref(),
            aggregate_id.as_str(),
            expected,
            actual
        ),
        ("pg_test_account", id.as_str(), 0, None)
    );
    let source = source.expect("the driver error is the source");
    let sqlx_err = source
        .downcast_ref::<sqlx::Error>()
        .expect("the source is a sqlx error");
    let db_err = sqlx_err.as_database_error().expect("a database error");
    assert!(db_err.is_unique_violation());
    assert_eq!(db_err.constraint(), Some("events_stream_sequence"));

    // A stale version found by the version check reports the actual version.
    let err = db
        .store
        .append::<Account>(&id, 5, deposits([3]), &no_metadata())
        .await
        .expect_err("past the end");
    assert!(
        matches!(
            err,
            Error::Conflict {
                expected: 5,
                actual: Some(1),
                source: None,
                ..
            }
        ),
        "{err:?}"
    );
    let loaded = db.store.load::<Account>(&id).await.unwrap();
    assert_eq!((loaded.version, loaded.aggregate.balance), (1, 1));
}

#[tokio::test]
async fn append_in_commits_and_rolls_back_with_the_callers_transaction() {
    let db = common::store().await;
    let read_model = db.table("read_model");
    sqlx::query(&format!(
        "CREATE TABLE {read_model} (id TEXT PRIMARY KEY, balance BIGINT NOT NULL)"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let id = new_id();

    // Commit: events, outbox rows and the read model change land together.
    let mut tx = db.pool.begin().await.unwrap();
    let stored = db
        .store
        .append_in::<Account>(&mut tx, &id, 0, deposits([10, 20]), &no_metadata())
        .await
        .unwrap();
    sqlx::query(&format!("INSERT INTO {read_model} VALUES ($1, 30)"))
        .bind(&id)
        .execute(&mut *tx)
        .await
        .unwrap();
    // Not visible outside the transaction before it commits.
    assert_eq!(db.store.load::<Account>(&id).await.unwrap().version, 0);
    tx.commit().await.unwrap();
    assert_eq!(
        db.store.read_stream::<Account>(&id, 0).await.unwrap(),
        stored
    );

    // Rollback: nothing of it stays.
    let outbox_before: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("outbox")))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    db.store
        .append_in::<Account>(&mut tx, &id, 2, deposits([5]), &no_metadata())
        .await
        .unwrap();
    sqlx::query(&format!(
        "UPDATE {read_model} SET balance = 35 WHERE id = $1"
    ))
    .bind(&id)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let loaded = db.store.load::<Account>(&id).await.unwrap();
    assert_eq!((loaded.version, loaded.aggregate.balance), (2, 30));
    let outbox_after: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("outbox")))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(outbox_after, outbox_before);
    let balance: i64 =
        sqlx::query_scalar(&format!("SELECT balance FROM {read_model} WHERE id = $1"))
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(balance, 30);

    // A conflict leaves the caller's transaction usable.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "UPDATE {read_model} SET balance = 99 WHERE id = $1"
    ))
    .bind(&id)
    .execute(&mut *tx)
    .await
    .unwrap();
    let err = db
        .store
        .append_in::<Account>(&mut tx, &id, 1, deposits([1]), &no_metadata())
        .await
        .expect_err("stale version");
    assert!(err.is_conflict());
    tx.commit().await.expect("the transaction is still usable");
    let balance: i64 =
        sqlx::query_scalar(&format!("SELECT balance FROM {read_model} WHERE id = $1"))
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(balance, 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_violation_inside_append_in_only_rolls_back_its_savepoint() {
    let db = common::store().await;
    let marker = db.table("marker");
    sqlx::query(&format!("CREATE TABLE {marker} (id TEXT PRIMARY KEY)"))
        .execute(&db.pool)
        .await
        .unwrap();
    let id = new_id();

    let mut first = db.pool.begin().await.unwrap();
    db.store
        .append_in::<Account>(&mut first, &id, 0, deposits([1]), &no_metadata())
        .await
        .unwrap();

    let second = tokio::spawn({
        let (store, pool, id, marker) = (
            db.store.clone(),
            db.pool.clone(),
            id.clone(),
            marker.clone(),
        );
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(&format!("INSERT INTO {marker} VALUES ('before')"))
                .execute(&mut *tx)
                .await
                .unwrap();
            let result = store
                .append_in::<Account>(&mut tx, &id, 0, deposits([2]), &no_metadata())
                .await;
            // Still usable after the failed statement: write and commit.
            sqlx::query(&format!("INSERT INTO {marker} VALUES ('after')"))
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            result
        }
    });
    wait_until_blocked(&db).await;
    first.commit().await.unwrap();

    let err = second.await.unwrap().expect_err("conflict");
    assert!(
        matches!(
            err,
            Error::Conflict {
                source: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    let markers: Vec<String> = sqlx::query_scalar(&format!("SELECT id FROM {marker} ORDER BY id"))
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(markers, ["after", "before"]);
    assert_eq!(
        db.store
            .load::<Account>(&id)
            .await
            .unwrap()
            .aggregate
            .balance,
        1
    );
}

#[tokio::test]
async fn every_event_gets_one_outbox_row_in_order_and_conflicts_write_none() {
    let db = common::store().await;
    let id = new_id();
    let outbox = db.table("outbox");

    let first = db
        .store
        .append::<Account>(&id, 0, deposits([1, 2, 3]), &no_metadata())
        .await
        .unwrap();
    let second = db
        .store
        .append::<Account>(&id, 3, deposits([4]), &no_metadata())
        .await
        .unwrap();
    db.store
        .append::<Account>(&id, 1, deposits([5, 6]), &no_metadata())
        .await
        .expect_err("stale");

    let rows = sqlx::query(&format!("SELECT id, position FROM {outbox} ORDER BY id"))
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let positions: Vec<u64> = rows
        .iter()
        .map(|r| r.get::<i64, _>("position") as u64)
        .collect();
    let expected: Vec<u64> = first.iter().chain(&second).map(|e| e.position).collect();
    assert_eq!(positions, expected);

    // The relay's join: outbox -> events, in outbox order.
    let joined: Vec<(i64, String)> = sqlx::query_as(&format!(
        "SELECT e.sequence, e.aggregate_id FROM {outbox} o JOIN {} e ON e.position = o.position ORDER BY o.id",
        db.table("events")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(joined, (1..=4).map(|s| (s, id.clone())).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_notify_listeners_and_wake_waiters() {
    notify_test(NotifyMode::InTransaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_notify_after_commit_when_configured() {
    notify_test(NotifyMode::AfterCommit).await;
}

async fn notify_test(mode: NotifyMode) {
    let db = common::store_with(5, |b| b.notify_mode(mode)).await;
    assert_eq!(db.store.notify_mode(), mode);
    let id = new_id();
    let first = db
        .store
        .append::<Account>(&id, 0, deposits([1]), &no_metadata())
        .await
        .unwrap();
    let cursor = first[0].position;

    // The relay's view: a raw LISTEN on the documented channel gets the last position.
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(db.store.notify_channel()).await.unwrap();
    assert_eq!(db.store.notify_channel(), format!("{}_events", db.schema));

    // Nothing new: the wait lasts the whole timeout.
    let started = Instant::now();
    db.store
        .wait_for_events(cursor, Duration::from_millis(300))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(290));

    let waiter = tokio::spawn({
        let store = db.store.clone();
        async move {
            let started = Instant::now();
            store.wait_for_events(cursor, Duration::from_secs(30)).await;
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let appended = db
        .store
        .append::<Account>(&id, 1, deposits([2, 3]), &no_metadata())
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the append wakes the waiter")
        .unwrap();
    assert!(
        waited >= Duration::from_millis(250),
        "woke before the append: {waited:?}"
    );

    // After commit, the first append's notification may still be on its way (it is sent
    // by a background task); it names an earlier position.
    let expected = appended[1].position;
    loop {
        let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("a notification")
            .unwrap();
        let position: u64 = notification.payload().parse().unwrap();
        if position == expected {
            break;
        }
        assert!(
            mode == NotifyMode::AfterCommit && position == cursor,
            "unexpected notification {position} (expected {expected})"
        );
    }

    // Events already there: no wait at all.
    let started = Instant::now();
    db.store
        .wait_for_events(cursor, Duration::from_secs(30))
        .await;
    assert!(started.elapsed() < Duration::from_secs(5));

    // `append_in` notifies when the caller commits, in every mode.
    let mut tx = db.pool.begin().await.unwrap();
    let joined = db
        .store
        .append_in::<Account>(&mut tx, &id, 3, deposits([4]), &no_metadata())
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(200), listener.recv()).await;
    assert!(early.is_err(), "notified before the commit: {early:?}");
    tx.commit().await.unwrap();
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification at commit")
        .unwrap();
    assert_eq!(notification.payload(), joined[0].position.to_string());
}

/// After commit, a steady stream of appends is announced at most once per
/// `notify_interval`, and the last notification carries the last position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_commit_notifications_are_spaced_by_the_interval() {
    const INTERVAL: Duration = Duration::from_millis(200);
    let db = common::store_with(5, |b| b.notify_interval(INTERVAL)).await;
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(db.store.notify_channel()).await.unwrap();

    let id = new_id();
    let started = Instant::now();
    let mut last = 0;
    for version in 0..40 {
        let stored = db
            .store
            .append::<Account>(&id, version, deposits([1]), &no_metadata())
            .await
            .unwrap();
        last = stored[0].position;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let appending = started.elapsed();

    let mut notifications = 0;
    loop {
        let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("the last append is announced")
            .unwrap();
        notifications += 1;
        let position: u64 = notification.payload().parse().unwrap();
        assert!(position <= last, "{position} > {last}");
        if position == last {
            break;
        }
    }
    let bound = appending.as_millis() / INTERVAL.as_millis() + 2;
    assert!(
        (1..=bound).contains(&notifications),
        "{notifications} notifications for 40 appends over {appending:?} (at most {bound})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_waiters_poll() {
    let db = common::store_with(5, |b| {
        b.notify(false).poll_interval(Duration::from_millis(50))
    })
    .await;
    assert_eq!(db.store.notify_mode(), NotifyMode::Off);
    let id = new_id();

    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(db.store.notify_channel()).await.unwrap();

    let waiter = tokio::spawn({
        let store = db.store.clone();
        async move {
            let started = Instant::now();
            store.wait_for_events(0, Duration::from_secs(30)).await;
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.store
        .append::<Account>(&id, 0, deposits([1]), &no_metadata())
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("polling finds the event")
        .unwrap();
    assert!(waited >= Duration::from_millis(150));

    // No notification was sent.
    let received = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(received.is_err(), "unexpected notification: {received:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let pool = common::pool(6).await;
    let schema = common::random_schema();
    let _guard = common::SchemaGuard {
        schema: schema.clone(),
    };
    let stores: Vec<PgEventStore> = (0..2)
        .map(|_| {
            PgEventStore::builder(pool.clone())
                .schema(&schema)
                .build()
                .unwrap()
        })
        .collect();
    let tasks: Vec<_> = stores
        .iter()
        .cloned()
        .map(|store| tokio::spawn(async move { store.migrate().await }))
        .collect();
    for task in tasks {
        task.await.unwrap().expect("concurrent migrate");
    }
    stores[0].migrate().await.expect("migrate again");

    let applied: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\"._sqlx_migrations WHERE success"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(applied, 6);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "_sqlx_migrations",
            "checkpoints",
            "commands",
            "consumer_parked",
            "events",
            "outbox",
            "outbox_leader",
            "outbox_parked",
            "parking_log",
            "process_states",
            "process_timer_firings",
            "process_timers",
            "projection_versions",
            "snapshots",
            "stream_checkpoints"
        ]
    );

    // The pool's connections keep their search_path: migrate used a connection of its own.
    let search_path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!search_path.contains(&schema), "{search_path}");

    let id = new_id();
    stores[1]
        .append::<Account>(&id, 0, deposits([1]), &no_metadata())
        .await
        .unwrap();
    assert_eq!(stores[0].load::<Account>(&id).await.unwrap().version, 1);
}

#[tokio::test]
async fn invalid_schema_names_are_rejected() {
    let pool = common::pool(1).await;
    for name in [
        "",
        "Thalo",
        "1x",
        "thalo-events",
        "a\"; DROP TABLE x; --",
        "pg_catalog",
    ] {
        let err = PgEventStore::builder(pool.clone())
            .schema(name)
            .build()
            .expect_err(name);
        assert!(matches!(err, Error::Config { .. }), "{name}: {err:?}");
    }
    // Valid, but too long for the notification channel unless notify is off.
    let long = "s".repeat(60);
    assert!(PgEventStore::builder(pool.clone())
        .schema(&long)
        .build()
        .is_err());
    let store = PgEventStore::builder(pool.clone())
        .schema(&long)
        .notify(false)
        .build()
        .unwrap();
    assert_eq!(store.schema().as_str(), long);
    assert_eq!(PgEventStore::new(pool).schema().as_str(), "thalo");
}

async fn snapshot_row(db: &common::TestDb, id: &str) -> Option<(i64, String)> {
    sqlx::query_as(&format!(
        "SELECT version, payload::text FROM {} WHERE aggregate_id = $1",
        db.table("snapshots")
    ))
    .bind(id)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn snapshots_are_written_by_policy_and_used_by_load() {
    let db = common::store_with(5, |b| b.snapshot_every::<Account>(5)).await;
    let id = new_id();
    db.store
        .append::<Account>(&id, 0, deposits(1..=4), &no_metadata())
        .await
        .unwrap();
    db.store.load::<Account>(&id).await.unwrap();
    assert_eq!(
        snapshot_row(&db, &id).await,
        None,
        "4 events are below the policy's 5"
    );

    db.store
        .append::<Account>(&id, 4, deposits(5..=12), &no_metadata())
        .await
        .unwrap();
    let loaded = db.store.load::<Account>(&id).await.unwrap();
    assert_eq!((loaded.version, loaded.aggregate.balance), (12, 78));
    let (version, _) = snapshot_row(&db, &id).await.expect("a snapshot");
    assert_eq!(version, 12);

    // Only events after the snapshot are replayed: delete the ones before it and the
    // state is still complete.
    db.store
        .append::<Account>(&id, 12, deposits([100, 200]), &no_metadata())
        .await
        .unwrap();
    sqlx::query(&format!(
        "DELETE FROM {} WHERE aggregate_id = $1 AND sequence <= 12",
        db.table("events")
    ))
    .bind(&id)
    .execute(&db.pool)
    .await
    .unwrap();
    let loaded = db.store.load::<Account>(&id).await.unwrap();
    assert_eq!(loaded.version, 14);
    assert_eq!(loaded.aggregate.balance, 78 + 300);
    assert_eq!(loaded.aggregate.deposits, 14);
    // 2 events since the snapshot: no new one yet.
    assert_eq!(snapshot_row(&db, &id).await.map(|s| s.0), Some(12));

    // Without a policy, no snapshots.
    let plain = common::store_with(2, |b| b).await;
    plain
        .store
        .append::<Account>(&id, 0, deposits(1..=20), &no_metadata())
        .await
        .unwrap();
    assert_eq!(
        plain
            .store
            .load::<Account>(&id)
            .await
            .unwrap()
            .aggregate
            .balance,
        210
    );
    assert_eq!(snapshot_row(&plain, &id).await, None);
}

#[tokio::test]
async fn a_corrupted_snapshot_falls_back_to_full_replay() {
    let db = common::store_with(5, |b| b.snapshot_every::<Account>(5)).await;
    let id = new_id();
    db.store
        .append::<Account>(&id, 0, deposits(1..=10), &no_metadata())
        .await
        .unwrap();
    let expected = db.store.load::<Account>(&id).await.unwrap();
    assert_eq!(snapshot_row(&db, &id).await.map(|s| s.0), Some(10));

    sqlx::query(&format!(
        "UPDATE {} SET payload = '{{\"not\": \"an account\"}}' WHERE aggregate_id = $1",
        db.table("snapshots")
    ))
    .bind(&id)
    .execute(&db.pool)
    .await
    .unwrap();
    let loaded = db.store.load::<Account>(&id).await.unwrap();
    assert_eq!(loaded, expected);
    assert_eq!((loaded.version, loaded.aggregate.balance), (10, 55));

    // The full replay wrote a good snapshot over the bad one.
    let (version, payload) = snapshot_row(&db, &id).await.unwrap();
    assert_eq!(version, 10);
    let restored: Account = serde_json::from_str(&payload).unwrap();
    assert_eq!(restored, expected.aggregate);
}

#[tokio::test]
async fn repository_execute_works_end_to_end() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    let id = new_id();
    for amount in 1..=3 {
        repo.execute::<Account>(&id, AccountCommand::Deposit { amount })
            .await
            .unwrap();
    }
    let err = repo
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("NON_POSITIVE_AMOUNT"));
    let account = repo.get::<Account>(&id).await.unwrap();
    assert_eq!((account.version, account.aggregate.balance), (3, 6));
}

/// The global-order guarantee under fire: writers commit out of position order (some
/// take their transaction id early, some take their positions and then sleep before
/// committing), while a reader follows `read_all` from its cursor. The reader must end
/// with every event exactly once, each stream in sequence order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_all_never_skips_an_event_that_commits_late() {
    const WRITERS: usize = 8;
    const BATCHES: u64 = 25;
    let db = common::store_with(24, |b| b).await;
    let done = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, pool) = (db.store.clone(), db.pool.clone());
            tokio::spawn(async move {
                let id = format!("writer-{w}");
                let mut version = 0;
                for batch in 0..BATCHES {
                    let n = 1 + batch % 3;
                    let events = deposits((0..n).map(|i| (batch * 10 + i) as i64 + 1));
                    match (w as u64 + batch) % 4 {
                        // Take a transaction id first, sleep, then append: the events get
                        // late positions but an early transaction id.
                        0 => {
                            let mut tx = pool.begin().await.unwrap();
                            sqlx::query("SELECT pg_current_xact_id(), pg_sleep(0.02)")
                                .execute(&mut *tx)
                                .await
                                .unwrap();
                            store
                                .append_in::<Account>(
                                    &mut tx,
                                    &id,
                                    version,
                                    events,
                                    &Metadata::default(),
                                )
                                .await
                                .unwrap();
                            tx.commit().await.unwrap();
                        }
                        // Take positions, then sleep before committing: later positions
                        // become visible first.
                        1 => {
                            let mut tx = pool.begin().await.unwrap();
                            store
                                .append_in::<Account>(
                                    &mut tx,
                                    &id,
                                    version,
                                    events,
                                    &Metadata::default(),
                                )
                                .await
                                .unwrap();
                            sqlx::query("SELECT pg_sleep(0.03)")
                                .execute(&mut *tx)
                                .await
                                .unwrap();
                            tx.commit().await.unwrap();
                        }
                        _ => {
                            store
                                .append::<Account>(&id, version, events, &Metadata::default())
                                .await
                                .unwrap();
                        }
                    }
                    version += n;
                }
                version
            })
        })
        .collect();

    // A naive reader (`position > cursor`) alongside, to show what the horizon prevents.
    let naive = tokio::spawn({
        let (pool, events, done) = (db.pool.clone(), db.table("events"), done.clone());
        async move {
            let mut cursor = 0_i64;
            let mut seen = 0_usize;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page: Vec<i64> = sqlx::query_scalar(&format!(
                    "SELECT position FROM {events} WHERE position > $1 ORDER BY position LIMIT 50"
                ))
                .bind(cursor)
                .fetch_all(&pool)
                .await
                .unwrap();
                if let Some(&last) = page.last() {
                    cursor = last;
                    seen += page.len();
                } else if finished {
                    return seen;
                } else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    });

    let reader = tokio::spawn({
        let (store, done) = (db.store.clone(), done.clone());
        async move {
            let mut cursor = 0;
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = store.read_all(cursor, 50).await.unwrap();
                match page.last() {
                    Some(last) => {
                        cursor = last.position;
                        seen.extend(
                            page.into_iter()
                                .map(|e| (e.aggregate_id, e.sequence, e.position)),
                        );
                    }
                    // Writers finished before this read started, and it found nothing:
                    // everything committed has been read.
                    None if finished => return seen,
                    None => tokio::time::sleep(Duration::from_millis(2)).await,
                }
                assert!(Instant::now() < deadline, "reader timed out");
            }
        }
    });

    let mut expected = BTreeMap::new();
    for (w, writer) in writers.into_iter().enumerate() {
        expected.insert(format!("writer-{w}"), writer.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();
    let naive_seen = naive.await.unwrap();

    let total: u64 = expected.values().sum();
    let unique: HashSet<_> = seen.iter().map(|(id, seq, _)| (id.clone(), *seq)).collect();
    assert_eq!(unique.len(), seen.len(), "an event was delivered twice");
    assert_eq!(seen.len() as u64, total, "the reader missed events");
    let positions: HashSet<u64> = seen.iter().map(|e| e.2).collect();
    assert_eq!(positions.len(), seen.len());
    for (id, version) in &expected {
        let sequences: Vec<u64> = seen.iter().filter(|e| &e.0 == id).map(|e| e.1).collect();
        assert_eq!(
            sequences,
            (1..=*version).collect::<Vec<_>>(),
            "stream {id} out of order"
        );
    }
    eprintln!(
        "read_all saw {} of {total} events; a naive `position > cursor` reader saw {naive_seen}",
        seen.len()
    );
}
