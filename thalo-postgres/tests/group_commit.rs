//! Group commit: the conformance suite, contention, mixed batches, outbox rows and the
//! fallback when a writer outside the batch races one of its streams.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{deposits, new_id, Account, AccountCommand, TestDb};
use sqlx::Connection;
use thalo::{Error, EventStore, Metadata, Repository};
use thalo_postgres::GroupCommit;

async fn group_store(max_connections: u32, config: GroupCommit) -> TestDb {
    common::store_with(max_connections, |b| b.group_commit(config)).await
}

async fn new_group_commit_store() -> common::GuardedStore {
    let db = group_store(10, GroupCommit::default()).await;
    common::GuardedStore {
        store: db.store,
        guard: db.guard,
    }
}

mod conformance {
    use super::new_group_commit_store;

    thalo_testing::store_conformance_tests!(new_group_commit_store);
}

/// `(aggregate_id, sequence, amount)` of every stored deposit, by stream and sequence.
async fn stored_deposits(db: &TestDb) -> HashMap<String, Vec<(i64, i64)>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT aggregate_id, sequence, (payload->>'amount')::int8 FROM {} \
         ORDER BY aggregate_id, sequence",
        db.table("events")
    ))
    .fetch_all(&db.pool)
    .await
    .expect("read events");
    let mut streams: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for (id, sequence, amount) in rows {
        streams.entry(id).or_default().push((sequence, amount));
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_contention_loses_and_doubles_nothing() {
    let db = group_store(16, GroupCommit::default()).await;
    let repo = Repository::new(db.store.clone()).with_max_attempts(1000);
    let hot = new_id();
    let mut tasks = Vec::new();
    // 32 tasks x 10 deposits on one aggregate; deposit amounts are distinct so a lost or
    // doubled one shows up in the sum and in the set.
    for task in 0..32_i64 {
        let repo = repo.clone();
        let hot = hot.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10_i64 {
                let amount = 1 + task * 10 + i;
                repo.execute::<Account>(&hot, AccountCommand::Deposit { amount })
                    .await
                    .expect("deposit on the hot aggregate");
            }
        }));
    }
    // 64 tasks on distinct aggregates, at the same time.
    let cold: Vec<String> = (0..64).map(|_| new_id()).collect();
    for id in cold.clone() {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            for amount in 1..=5_i64 {
                repo.execute::<Account>(&id, AccountCommand::Deposit { amount })
                    .await
                    .expect("deposit on a cold aggregate");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }

    let streams = stored_deposits(&db).await;
    let hot_rows = &streams[&hot];
    let sequences: Vec<i64> = hot_rows.iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, (1..=320).collect::<Vec<_>>());
    let mut amounts: Vec<i64> = hot_rows.iter().map(|(_, a)| *a).collect();
    amounts.sort_unstable();
    assert_eq!(amounts, (1..=320).collect::<Vec<_>>());
    let loaded = db.store.load::<Account>(&hot).await.expect("load hot");
    assert_eq!(loaded.aggregate.balance, (1..=320).sum::<i64>());
    assert_eq!(loaded.version, 320);

    for id in &cold {
        let rows = &streams[id];
        assert_eq!(rows, &vec![(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], "{id}");
        let loaded = db.store.load::<Account>(id).await.expect("load cold");
        assert_eq!(loaded.aggregate.balance, 15);
    }
    assert_eq!(streams.len(), 65);
}

/// Small batches force several of them in flight at once: streams are never shared
/// between batches in flight, so nothing conflicts that would not without group commit,
/// and every append lands exactly once, in sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_batches_in_flight_keep_streams_apart() {
    let config = GroupCommit::default()
        .with_max_batch(3)
        .with_max_in_flight(4);
    assert_eq!(config.in_flight_limit(), 4);
    let db = group_store(16, config).await;
    let store = db.store.clone();
    let ids: Vec<String> = (0..12).map(|_| new_id()).collect();
    let mut tasks = Vec::new();
    // One writer per stream, each appending with the version it knows: any conflict
    // would mean two batches in flight raced on one stream.
    for id in ids.clone() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for version in 0..20_u64 {
                let amount = i64::try_from(version).expect("small") + 1;
                store
                    .append::<Account>(&id, version, deposits([amount]), &Metadata::default())
                    .await
                    .expect("append without a conflict");
            }
        }));
    }
    // Meanwhile, writers racing on one shared stream through the repository.
    let repo = Repository::new(store.clone()).with_max_attempts(1000);
    let hot = new_id();
    for task in 0..8_i64 {
        let repo = repo.clone();
        let hot = hot.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10_i64 {
                repo.execute::<Account>(
                    &hot,
                    AccountCommand::Deposit {
                        amount: 1 + task * 10 + i,
                    },
                )
                .await
                .expect("deposit on the hot aggregate");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let streams = stored_deposits(&db).await;
    for id in &ids {
        let expected: Vec<(i64, i64)> = (1..=20).map(|n| (n, n)).collect();
        assert_eq!(streams[id], expected, "{id}");
    }
    let mut amounts: Vec<i64> = streams[&hot].iter().map(|(_, a)| *a).collect();
    amounts.sort_unstable();
    assert_eq!(amounts, (1..=80).collect::<Vec<_>>());
    let sequences: Vec<i64> = streams[&hot].iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, (1..=80).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_mixed_batch_isolates_conflicts() {
    // A short wait makes the appends below land in few batches.
    let db = group_store(
        10,
        GroupCommit::default().with_max_wait(Duration::from_millis(20)),
    )
    .await;
    let contended = new_id();
    db.store
        .append::<Account>(&contended, 0, deposits([1, 2]), &Metadata::new())
        .await
        .expect("seed");

    let mut tasks = Vec::new();
    // 16 appends to the contended stream, all with the stale expected version 1.
    for i in 0..16_i64 {
        let store = db.store.clone();
        let id = contended.clone();
        tasks.push(tokio::spawn(async move {
            let result = store
                .append::<Account>(&id, 1, deposits([100 + i]), &Metadata::new())
                .await;
            (id, result)
        }));
    }
    // 16 appends at version 2 (the head): exactly one may win.
    for i in 0..16_i64 {
        let store = db.store.clone();
        let id = contended.clone();
        tasks.push(tokio::spawn(async move {
            let result = store
                .append::<Account>(&id, 2, deposits([200 + i]), &Metadata::new())
                .await;
            (id, result)
        }));
    }
    let others: Vec<String> = (0..32).map(|_| new_id()).collect();
    for id in others.clone() {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let result = store
                .append::<Account>(&id, 0, deposits([7, 8]), &Metadata::new())
                .await;
            (id, result)
        }));
    }

    let mut winners = 0;
    let mut conflicts = 0;
    for task in tasks {
        let (id, result) = task.await.expect("task");
        if id == contended {
            match result {
                Ok(stored) => {
                    winners += 1;
                    assert_eq!(stored.len(), 1);
                    assert_eq!(stored[0].sequence, 3);
                }
                Err(Error::Conflict {
                    aggregate_id,
                    expected,
                    actual,
                    ..
                }) => {
                    conflicts += 1;
                    assert_eq!(aggregate_id, contended);
                    assert!(expected == 1 || expected == 2, "expected {expected}");
                    // The head it lost to: 2 (the seed), or 3 once the winner is in.
                    let actual = actual.expect("actual version in a batched conflict");
                    assert!(actual == 2 || actual == 3, "actual {actual}");
                    assert_ne!(actual, expected);
                }
                Err(other) => panic!("unexpected error: {other:?}"),
            }
        } else {
            let stored = result.expect("an uncontended stream succeeds");
            assert_eq!(
                stored.iter().map(|e| e.sequence).collect::<Vec<_>>(),
                vec![1, 2]
            );
            assert!(stored[0].position < stored[1].position);
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(conflicts, 31);

    let streams = stored_deposits(&db).await;
    let contended_rows = &streams[&contended];
    assert_eq!(contended_rows.len(), 3);
    assert!((200..216).contains(&contended_rows[2].1));
    for id in &others {
        assert_eq!(streams[id], vec![(1, 7), (2, 8)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_writes_one_outbox_row_per_event() {
    let db = group_store(10, GroupCommit::default()).await;
    let mut tasks = Vec::new();
    for n in 1..=20_i64 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let amounts: Vec<i64> = (1..=n % 4 + 1).collect();
            store
                .append::<Account>(&new_id(), 0, deposits(amounts), &Metadata::new())
                .await
                .expect("append")
        }));
    }
    let mut positions = Vec::new();
    for task in tasks {
        positions.extend(task.await.expect("task").iter().map(|e| e.position));
    }
    positions.sort_unstable();

    let outbox: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT position FROM {} ORDER BY position",
        db.table("outbox")
    ))
    .fetch_all(&db.pool)
    .await
    .expect("read outbox");
    let events: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT position FROM {} ORDER BY position",
        db.table("events")
    ))
    .fetch_all(&db.pool)
    .await
    .expect("read events");
    let returned: Vec<i64> = positions
        .iter()
        .map(|p| i64::try_from(*p).expect("position"))
        .collect();
    assert_eq!(outbox, events);
    assert_eq!(events, returned);
    assert_eq!(
        events.len(),
        (1..=20).map(|n| n % 4 + 1).sum::<i64>() as usize
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_falls_back_when_a_writer_outside_the_batch_races() {
    // A wait long enough that the appends below form one batch.
    let db = group_store(
        10,
        GroupCommit::default().with_max_wait(Duration::from_millis(100)),
    )
    .await;
    let raced = new_id();

    // A caller's transaction appends to `raced` and stays open: its row is inserted but
    // not committed, and the batch's head check cannot see it.
    let mut conn = db.pool.acquire().await.expect("acquire");
    let mut tx = conn.begin().await.expect("begin");
    db.store
        .append_in::<Account>(&mut tx, &raced, 0, deposits([1]), &Metadata::new())
        .await
        .expect("append_in");

    let mut tasks = Vec::new();
    {
        let store = db.store.clone();
        let id = raced.clone();
        tasks.push(tokio::spawn(async move {
            let result = store
                .append::<Account>(&id, 0, deposits([2]), &Metadata::new())
                .await;
            (id, result)
        }));
    }
    let others: Vec<String> = (0..8).map(|_| new_id()).collect();
    for id in others.clone() {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let result = store
                .append::<Account>(&id, 0, deposits([3]), &Metadata::new())
                .await;
            (id, result)
        }));
    }
    // Let the batch form and block on the uncommitted row, then commit under it: the
    // batch statement fails on the unique constraint and falls back.
    tokio::time::sleep(Duration::from_millis(400)).await;
    tx.commit().await.expect("commit the caller's transaction");

    for task in tasks {
        let (id, result) = task.await.expect("task");
        if id == raced {
            match result {
                Err(Error::Conflict {
                    expected, actual, ..
                }) => {
                    assert_eq!(expected, 0);
                    assert_eq!(actual, Some(1));
                }
                other => panic!("expected a conflict on the raced stream, got {other:?}"),
            }
        } else {
            let stored = result.expect("the other streams of the batch succeed");
            assert_eq!(stored.len(), 1);
            assert_eq!(stored[0].sequence, 1);
        }
    }

    let streams = stored_deposits(&db).await;
    assert_eq!(streams[&raced], vec![(1, 1)]);
    for id in &others {
        assert_eq!(streams[id], vec![(1, 3)]);
    }
    let outbox: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("outbox")))
        .fetch_one(&db.pool)
        .await
        .expect("count outbox");
    assert_eq!(outbox, 9);
}

#[tokio::test]
async fn group_commit_is_reported_and_off_by_default() {
    let plain = common::store().await;
    assert_eq!(plain.store.group_commit(), None);
    let db = group_store(2, GroupCommit::default().with_max_batch(8)).await;
    let config = db.store.group_commit().expect("group commit on");
    assert_eq!(config.batch_limit(), 8);
    assert_eq!(config.wait(), Duration::ZERO);
}
