//! Edge cases against a real Postgres: a bad append inside a group-commit batch, a late
//! commit's notification, a subscription whose store keeps failing, and transaction ids
//! restored from another cluster.

mod common;

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{deposits, new_id, Account, AccountEvent, Note, TestDb, WrittenEvent};
use sqlx::postgres::PgListener;
use sqlx::PgConnection;
use thalo::{CheckpointStore, Error, EventEnvelope, EventStore, Metadata, RawEvent};
use thalo_postgres::{GroupCommit, PgProjection, PgSubscription};

fn no_metadata() -> Metadata {
    Metadata::default()
}

/// Waits until a statement on the test's events table is blocked on a lock.
async fn wait_until_blocked(db: &TestDb) {
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
    panic!("the append never blocked");
}

/// Reads the global log until it holds `count` events: an open transaction of a test
/// running in parallel on the same cluster holds the read horizon back for a moment.
async fn read_settled(db: &TestDb, count: usize) -> Vec<EventEnvelope<RawEvent>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = common::read_everything(&db.store).await;
        if all.len() >= count {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} events became readable",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// --- Group commit: one bad append fails alone ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_append_fails_alone_in_a_group_commit_batch() {
    // The committer waits for more appends after the first one, so the concurrent
    // appends below share a batch (or a few).
    let config = GroupCommit::default().with_max_wait(Duration::from_millis(50));
    let db = common::store_with(16, |b| b.group_commit(config)).await;
    const APPENDS: usize = 24;
    const BAD: usize = 11;
    let ids: Vec<String> = (0..APPENDS)
        .map(|i| format!("note-{i}-{}", new_id()))
        .collect();
    let start = Arc::new(tokio::sync::Barrier::new(APPENDS));
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (store, id, start) = (db.store.clone(), id.clone(), Arc::clone(&start));
            // `jsonb` rejects the escape `\u0000` with SQLSTATE 22P05.
            let text = if i == BAD {
                "nul \u{0} inside".to_owned()
            } else {
                format!("note {i}")
            };
            tokio::spawn(async move {
                start.wait().await;
                store
                    .append::<Note>(&id, 0, vec![WrittenEvent { text }.into()], &no_metadata())
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task"));
    }

    for (i, (id, result)) in ids.iter().zip(&results).enumerate() {
        if i == BAD {
            let err = result.as_ref().expect_err("the bad append fails");
            assert!(matches!(err, Error::Store { .. }), "{err:?}");
            let code = err
                .source()
                .and_then(|source| source.downcast_ref::<sqlx::Error>())
                .and_then(|sqlx_err| sqlx_err.as_database_error())
                .and_then(|db_err| db_err.code().map(|code| code.into_owned()));
            assert_eq!(code.as_deref(), Some("22P05"), "{err:?}");
            continue;
        }
        let stored = result
            .as_ref()
            .unwrap_or_else(|err| panic!("append {i} failed with the bad one: {err:?}"));
        assert_eq!(stored.len(), 1);
        assert_eq!(
            (stored[0].sequence, stored[0].aggregate_id.as_str()),
            (1, id.as_str())
        );
        let read = db
            .store
            .read_stream::<Note>(id, 0)
            .await
            .expect("read back");
        assert_eq!(read.len(), 1, "{id}");
        assert_eq!(read[0].position, stored[0].position);
        let common::NoteEvent::Written(written) = &read[0].event;
        assert_eq!(written.text, format!("note {i}"));
    }

    let bad_rows: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE aggregate_id = $1",
        db.table("events")
    ))
    .bind(&ids[BAD])
    .fetch_one(&db.pool)
    .await
    .expect("count");
    assert_eq!(bad_rows, 0);
    let all: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("events")))
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(all, (APPENDS - 1) as i64);
    let outboxed: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("outbox")))
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(
        outboxed, all,
        "one outbox row per stored event, none for the bad one"
    );

    // The bad stream is still empty and usable.
    let fixed = db
        .store
        .append::<Note>(
            &ids[BAD],
            0,
            vec![WrittenEvent {
                text: "fine".into(),
            }
            .into()],
            &no_metadata(),
        )
        .await
        .expect("a good append on the bad stream");
    assert_eq!(fixed[0].sequence, 1);
}

// --- Notifications: a late commit is announced ---------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_commits_after_a_later_position_still_notifies() {
    // The default mode: notifications come from the store's background announcer.
    let db = common::store().await;
    let mut listener = PgListener::connect_with(&db.pool).await.expect("listener");
    listener
        .listen(db.store.notify_channel())
        .await
        .expect("listen");
    let (late, early) = (new_id(), new_id());

    // A transaction holds sequence 1 of the late stream, so the late append below takes
    // its position and then waits on the unique index until the transaction ends.
    let mut blocker = db.pool.begin().await.expect("begin");
    db.store
        .append_in::<Account>(&mut blocker, &late, 0, deposits([1]), &no_metadata())
        .await
        .expect("the blocking append");
    let late_append = tokio::spawn({
        let (store, late) = (db.store.clone(), late.clone());
        async move {
            store
                .append::<Account>(&late, 0, deposits([2]), &no_metadata())
                .await
        }
    });
    wait_until_blocked(&db).await;

    // A higher position commits first and is announced.
    let stored = db
        .store
        .append::<Account>(&early, 0, deposits([3]), &no_metadata())
        .await
        .expect("the early append");
    let higher = stored[0].position;
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("the early append is announced")
        .expect("notification");
    assert_eq!(notification.payload(), higher.to_string());

    // The blocker rolls back: the late append commits its lower position now.
    blocker.rollback().await.expect("rollback");
    let stored = late_append
        .await
        .expect("task")
        .expect("the late append succeeds");
    let lower = stored[0].position;
    assert!(lower < higher, "positions {lower} and {higher}");

    // Its commit is news too: listeners must hear of it well before any poll interval.
    let notification = tokio::time::timeout(Duration::from_millis(500), listener.recv())
        .await
        .expect("the late commit is announced within 500 ms")
        .expect("notification");
    let payload: u64 = notification.payload().parse().expect("a position");
    assert!(payload >= lower, "payload {payload}");
    let all = read_settled(&db, 2).await;
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert!(
        positions.contains(&lower) && positions.contains(&higher),
        "{positions:?}"
    );
}

// --- Subscriptions: back off while the store fails -----------------------------------

/// Sums deposits into `<schema>.balances` and counts its calls.
struct Balances {
    upsert: String,
    calls: AtomicUsize,
}

impl PgProjection<AccountEvent> for Balances {
    fn name(&self) -> &str {
        "balances"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_backs_off_while_the_store_fails_and_then_catches_up() {
    let db = common::store().await;
    let balances = db.table("balances");
    sqlx::query(&format!(
        "CREATE TABLE {balances} (account TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
    ))
    .execute(&db.pool)
    .await
    .expect("create balances");
    // Every batch handles its event and then fails to save its checkpoint: a store error
    // (not the projection's), which the runner retries.
    let checkpoints = db.table("checkpoints");
    let refuse = format!("\"{}\".refuse_checkpoints", db.schema);
    sqlx::query(&format!(
        "CREATE FUNCTION {refuse}() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'checkpoints are read-only'; END $$"
    ))
    .execute(&db.pool)
    .await
    .expect("create function");
    sqlx::query(&format!(
        "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {checkpoints}
         FOR EACH ROW EXECUTE FUNCTION {refuse}()"
    ))
    .execute(&db.pool)
    .await
    .expect("create trigger");

    let id = new_id();
    let stored = db
        .store
        .append::<Account>(&id, 0, deposits([42]), &no_metadata())
        .await
        .expect("append");
    read_settled(&db, 1).await;

    let projection = Arc::new(Balances {
        upsert: format!(
            "INSERT INTO {balances} AS b (account, cents) VALUES ($1, $2)
             ON CONFLICT (account) DO UPDATE SET cents = b.cents + EXCLUDED.cents"
        ),
        calls: AtomicUsize::new(0),
    });
    // A long idle timeout: only the backoff decides how often the failing batch runs.
    let subscription = PgSubscription::new::<Account>(db.store.clone(), Arc::clone(&projection))
        .with_poll_interval(Duration::from_secs(60));
    let progress = subscription.progress();
    let stop = thalo::Shutdown::new();
    let running = tokio::spawn(subscription.run(stop.clone()));

    // Attempts at about 0, 0.1, 0.3 and 0.7 s (the next at 1.5 s): 4 in 1.2 s, where
    // retrying at once would run the batch thousands of times.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let attempts = projection.calls.load(Ordering::SeqCst);
    assert!((3..=5).contains(&attempts), "{attempts} attempts in 1.2 s");
    assert_eq!(
        db.store
            .load_checkpoint("balances")
            .await
            .expect("checkpoint"),
        None
    );
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {balances}"))
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 0, "every failed batch rolled back");

    // The store recovers: the next retry (about 0.3 s away) applies the batch, once.
    sqlx::query(&format!("DROP TRIGGER refuse ON {checkpoints}"))
        .execute(&db.pool)
        .await
        .expect("drop trigger");
    progress
        .wait_until_projected(&stored, Duration::from_secs(10))
        .await
        .expect("the subscription catches up");
    assert_eq!(
        db.store
            .load_checkpoint("balances")
            .await
            .expect("checkpoint"),
        Some(stored[0].position)
    );
    let rows: Vec<(String, i64)> =
        sqlx::query_as(&format!("SELECT account, cents FROM {balances}"))
            .fetch_all(&db.pool)
            .await
            .expect("balances");
    assert_eq!(rows, vec![(id.clone(), 42)]);

    // Back to following the log: a new event is applied promptly.
    let stored = db
        .store
        .append::<Account>(&id, 1, deposits([8]), &no_metadata())
        .await
        .expect("append");
    progress
        .wait_until_projected(&stored, Duration::from_secs(10))
        .await
        .expect("the new event is applied");
    let rows: Vec<(String, i64)> =
        sqlx::query_as(&format!("SELECT account, cents FROM {balances}"))
            .fetch_all(&db.pool)
            .await
            .expect("balances");
    assert_eq!(rows, vec![(id.clone(), 50)]);

    stop.trigger();
    running
        .await
        .expect("task")
        .expect("the subscription stops cleanly");
}

// --- Transaction ids restored from another cluster -----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ids_from_another_cluster_are_detected_and_rebased() {
    let db = common::store().await;
    let events = db.table("events");
    assert!(
        db.store.check_transaction_ids().await.is_ok(),
        "an empty store is fine"
    );

    // Events across streams and transactions, some transactions with several events.
    let accounts: Vec<String> = (0..3).map(|_| new_id()).collect();
    for (i, id) in accounts.iter().enumerate() {
        db.store
            .append::<Account>(id, 0, deposits([1, 2]), &no_metadata())
            .await
            .expect("append");
        db.store
            .append::<Note>(
                &format!("note-{i}-{id}"),
                0,
                vec![WrittenEvent {
                    text: format!("n{i}"),
                }
                .into()],
                &no_metadata(),
            )
            .await
            .expect("append");
    }
    // Two streams in one transaction.
    let mut tx = db.pool.begin().await.expect("begin");
    for id in &accounts[..2] {
        db.store
            .append_in::<Account>(&mut tx, id, 2, deposits([3]), &no_metadata())
            .await
            .expect("append_in");
    }
    tx.commit().await.expect("commit");
    let before = read_settled(&db, 11).await;
    assert_eq!(before.len(), 11);
    db.store.check_transaction_ids().await.expect("fine before");

    // What a restore into a younger cluster looks like: ids far beyond this cluster's.
    sqlx::query(&format!(
        "UPDATE {events} SET transaction_id = (transaction_id::text::bigint + 1000000000)::text::xid8"
    ))
    .execute(&db.pool)
    .await
    .expect("simulate the restore");
    let max: String =
        sqlx::query_scalar(&format!("SELECT max(transaction_id)::text FROM {events}"))
            .fetch_one(&db.pool)
            .await
            .expect("max");

    let err = db
        .store
        .check_transaction_ids()
        .await
        .expect_err("ids ahead of the cluster");
    let Error::Config { message } = &err else {
        panic!("expected a configuration error, got {err:?}");
    };
    for part in [max.as_str(), "restored", "rebase_transaction_ids"] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
    let err = db.store.migrate().await.expect_err("migrate refuses too");
    assert!(matches!(err, Error::Config { .. }), "{err:?}");

    let renumbered = db.store.rebase_transaction_ids().await.expect("rebase");
    assert_eq!(renumbered, 11);
    db.store.check_transaction_ids().await.expect("fine after");
    db.store.migrate().await.expect("migrate after");
    let (low, high, distinct): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT min(transaction_id::text::bigint), max(transaction_id::text::bigint), \
         count(DISTINCT transaction_id) FROM {events}"
    ))
    .fetch_one(&db.pool)
    .await
    .expect("ids");
    assert_eq!((low, high), (3, distinct + 2), "dense from 3");
    assert_eq!(distinct, 7, "six appends and one shared transaction");

    // Same events, same order, nothing new.
    let after = read_settled(&db, 11).await;
    assert_eq!(after, before);
    assert_eq!(db.store.rebase_transaction_ids().await.expect("again"), 0);

    // New appends sort after the restored events, also for a reader whose cursor is
    // on the last of them.
    let cursor = before.last().map(|e| e.position).expect("events");
    let stored = db
        .store
        .append::<Account>(&accounts[2], 2, deposits([4]), &no_metadata())
        .await
        .expect("append after the rebase");
    let all = read_settled(&db, 12).await;
    assert_eq!(all[..11], before[..]);
    assert_eq!(all[11].position, stored[0].position);
    let next = db
        .store
        .read_all(cursor, 10)
        .await
        .expect("read after cursor");
    let positions: Vec<u64> = next.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![stored[0].position]);
}
