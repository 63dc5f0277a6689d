//! The behavioural suite every [`EventStore`] must pass.
//!
//! [`store_conformance_tests!`](crate::store_conformance_tests) expands to one
//! `#[tokio::test]` per check, each with a store from the given async constructor:
//!
//! ```
//! async fn new_store() -> thalo::InMemoryEventStore {
//!     thalo::InMemoryEventStore::new()
//! }
//!
//! thalo_testing::store_conformance_tests!(new_store);
//! # fn main() {}
//! ```
//!
//! (The crate using it needs `tokio` with the `macros` and `rt-multi-thread` features.)
//! Every check uses fresh random aggregate ids and looks only at its own events, so the
//! checks may share one store and run in parallel.

#![allow(missing_docs, clippy::missing_panics_doc)]

use std::collections::HashSet;
use std::sync::Arc;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use thalo::{
    commands, events, Aggregate, CheckpointStore, CommandId, CommandKey, Error, EventEnvelope,
    EventStore, Loaded, Metadata, Once, RawEvent, Recorded, Rejection, Repository,
};
use tokio::sync::Barrier;
use uuid::Uuid;

/// An account aggregate used by the suite.
#[derive(Aggregate, Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[aggregate(name = "conformance_account", snapshot)]
pub struct Account {
    #[identity]
    pub id: String,
    pub opened: bool,
    pub balance: i64,
    pub deposits: u64,
}

#[commands]
impl Account {
    /// Opens the account.
    pub fn open(&self) -> Result<Option<OpenedEvent>, Error> {
        if self.opened {
            return Err(Error::invariant_code("ALREADY_OPENED"));
        }
        Ok(Some(OpenedEvent {}))
    }

    /// Deposits `amount`.
    pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> {
        if amount <= 0 {
            return Err(Error::invariant_code("NON_POSITIVE_AMOUNT"));
        }
        Ok(DepositedEvent { amount })
    }

    /// Withdraws `amount`, which must be covered by the balance.
    pub fn withdraw(&self, amount: i64) -> Result<WithdrawnEvent, Error> {
        if amount > self.balance {
            return Err(Error::invariant_code("INSUFFICIENT_FUNDS"));
        }
        Ok(WithdrawnEvent { amount })
    }

    /// Deposits several amounts at once.
    pub fn deposit_many(&self, amounts: Vec<i64>) -> Result<Vec<DepositedEvent>, Error> {
        Ok(amounts
            .into_iter()
            .map(|amount| DepositedEvent { amount })
            .collect())
    }
}

#[events]
impl Account {
    /// The account was opened.
    pub fn opened(&mut self) {
        self.opened = true;
    }

    /// Money was deposited.
    pub fn deposited(&mut self, amount: i64) {
        self.balance += amount;
        self.deposits += 1;
    }

    /// Money was withdrawn.
    pub fn withdrawn(&mut self, amount: i64) {
        self.balance -= amount;
    }
}

/// A second aggregate type, to check that streams are keyed by type and id.
#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "conformance_note")]
pub struct Note {
    #[identity]
    pub id: String,
    pub text: String,
}

#[commands]
impl Note {
    /// Writes the note.
    pub fn write(&self, text: String) -> Result<WrittenEvent, Error> {
        Ok(WrittenEvent { text })
    }
}

#[events]
impl Note {
    /// The note was written.
    pub fn written(&mut self, text: String) {
        self.text = text;
    }
}

fn new_id() -> String {
    format!("acc-{}", Uuid::new_v4())
}

fn deposits(amounts: &[i64]) -> Vec<AccountEvent> {
    amounts
        .iter()
        .map(|&amount| DepositedEvent { amount }.into())
        .collect()
}

/// Appends events, returns them with contiguous sequences and increasing positions, and
/// loads the aggregate with them applied.
pub async fn append_and_load<S: EventStore>(store: S) {
    let id = new_id();
    let fresh = store.load::<Account>(&id).await.expect("load a new stream");
    assert_eq!(fresh.version, 0);
    assert_eq!(fresh.aggregate, Account::new(id.clone()));

    let stored = store
        .append::<Account>(&id, 0, deposits(&[5, 7, 11]), &Metadata::default())
        .await
        .expect("append");
    assert_eq!(stored.len(), 3);
    assert_eq!(
        stored.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(stored.windows(2).all(|w| w[0].position < w[1].position));
    assert!(stored
        .iter()
        .all(|e| e.aggregate_type == "conformance_account"));
    assert!(stored.iter().all(|e| e.aggregate_id == id));
    let ids: HashSet<_> = stored.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 3, "event ids are unique");
    assert_eq!(
        stored.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        deposits(&[5, 7, 11])
    );

    let more = store
        .append::<Account>(&id, 3, deposits(&[1]), &Metadata::default())
        .await
        .expect("append at version 3");
    assert_eq!(more[0].sequence, 4);
    assert!(more[0].position > stored[2].position);

    let loaded = store.load::<Account>(&id).await.expect("load");
    assert_eq!(loaded.version, 4);
    assert_eq!(loaded.aggregate.balance, 24);
    assert_eq!(loaded.aggregate.deposits, 4);

    let read = store
        .read_stream::<Account>(&id, 0)
        .await
        .expect("read stream");
    assert_eq!(read.len(), 4);
    assert_eq!(
        read[..3],
        stored[..],
        "read back exactly what append returned"
    );
    assert_eq!(read[3], more[0]);
}

/// An append with the wrong expected version is a conflict and stores nothing.
pub async fn expected_version_conflict<S: EventStore>(store: S) {
    let id = new_id();
    store
        .append::<Account>(&id, 0, deposits(&[1, 2]), &Metadata::default())
        .await
        .expect("first append");

    for expected in [0, 1, 3, 10] {
        let err = store
            .append::<Account>(&id, expected, deposits(&[100]), &Metadata::default())
            .await
            .expect_err("stale expected version must conflict");
        match err {
            Error::Conflict {
                aggregate_type,
                aggregate_id,
                expected: reported,
                ..
            } => {
                assert_eq!(aggregate_type, "conformance_account");
                assert_eq!(aggregate_id, id);
                assert_eq!(reported, expected);
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    let loaded = store.load::<Account>(&id).await.expect("load");
    assert_eq!((loaded.version, loaded.aggregate.balance), (2, 3));
}

/// Of many concurrent appends with the same expected version, exactly one wins.
pub async fn concurrent_appends_one_wins<S: EventStore + 'static>(store: S) {
    const WRITERS: usize = 8;
    let store = Arc::new(store);
    let id = new_id();
    store
        .append::<Account>(&id, 0, deposits(&[1]), &Metadata::default())
        .await
        .expect("first append");

    let barrier = Arc::new(Barrier::new(WRITERS));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (store, barrier, id) = (store.clone(), barrier.clone(), id.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .append::<Account>(&id, 1, deposits(&[10 + i as i64, 1]), &Metadata::default())
                    .await
            })
        })
        .collect();

    let mut wins = 0;
    let mut conflicts = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(stored) => {
                wins += 1;
                assert_eq!(stored[0].sequence, 2);
            }
            Err(err) if err.is_conflict() => conflicts += 1,
            Err(err) => panic!("unexpected error: {err:?}"),
        }
    }
    assert_eq!((wins, conflicts), (1, WRITERS - 1));
    let loaded = store.load::<Account>(&id).await.expect("load");
    assert_eq!(loaded.version, 3, "only the winner's two events are stored");
}

/// `Repository::execute` reloads and retries on conflicts: concurrent deposits all land
/// exactly once.
pub async fn execute_retries_on_conflict<S: EventStore + 'static>(store: S) {
    const CLIENTS: i64 = 8;
    let repo = Arc::new(Repository::new(store).with_max_attempts(100));
    let id = new_id();
    repo.execute::<Account>(&id, AccountCommand::Open)
        .await
        .expect("open");

    let barrier = Arc::new(Barrier::new(CLIENTS as usize));
    let tasks: Vec<_> = (1..=CLIENTS)
        .map(|amount| {
            let (repo, barrier, id) = (repo.clone(), barrier.clone(), id.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                repo.execute::<Account>(&id, AccountCommand::Deposit { amount })
                    .await
            })
        })
        .collect();
    for task in tasks {
        let stored = task
            .await
            .expect("task")
            .expect("execute retries until it wins");
        assert_eq!(stored.len(), 1);
    }

    let loaded = repo.load::<Account>(&id).await.expect("load");
    assert_eq!(loaded.version, 1 + CLIENTS as u64);
    assert_eq!(loaded.aggregate.balance, (1..=CLIENTS).sum::<i64>());

    let sequences: Vec<u64> = repo
        .store()
        .read_stream::<Account>(&id, 0)
        .await
        .expect("read")
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, (1..=1 + CLIENTS as u64).collect::<Vec<_>>());

    let err = repo
        .execute::<Account>(&id, AccountCommand::Open)
        .await
        .expect_err("invariant");
    assert_eq!(err.code(), Some("ALREADY_OPENED"));
    assert_eq!(
        repo.load::<Account>(&id).await.expect("load").version,
        1 + CLIENTS as u64
    );
}

/// A repository with an aggregate cache starts commands from its cached aggregates, and
/// a cached aggregate that another writer made stale is caught by the store's version
/// check, dropped and reloaded: deposits from cached and uncached repositories, one
/// after another and concurrently, all land exactly once.
pub async fn cached_execute_detects_stale_entries<S: EventStore + 'static>(store: S) {
    let store = Arc::new(store);
    let cached = Arc::new(
        Repository::new(store.clone())
            .with_cache(64)
            .with_max_attempts(100),
    );
    let other = Arc::new(Repository::new(store.clone()).with_max_attempts(100));
    let id = new_id();
    let stats = |repo: &Repository<Arc<S>>| {
        let stats = repo.cache_stats().expect("cache");
        (stats.hits, stats.misses, stats.stale)
    };

    cached
        .execute::<Account>(&id, AccountCommand::Open)
        .await
        .expect("open");
    cached
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 10 })
        .await
        .expect("deposit from the cache");
    assert_eq!(
        stats(&cached),
        (1, 1, 0),
        "loaded once, then from the cache"
    );

    // Another writer appends behind the cache's back.
    other
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 5 })
        .await
        .expect("deposit elsewhere");
    let stored = cached
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 20 })
        .await
        .expect("stale entry: conflict, reload, retry");
    assert_eq!(stored[0].sequence, 4);
    assert_eq!(
        stats(&cached),
        (2, 2, 1),
        "the stale entry was caught and reloaded"
    );

    // A command the cached aggregate rejects is decided again on the stored one.
    let err = cached
        .execute::<Account>(&id, AccountCommand::Open)
        .await
        .expect_err("already opened");
    assert_eq!(err.code(), Some("ALREADY_OPENED"));
    assert_eq!(stats(&cached), (2, 3, 1));
    cached
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 1 })
        .await
        .expect("deposit");
    assert_eq!(
        stats(&cached),
        (2, 4, 1),
        "the rejection left nothing cached"
    );

    // The cache never changes an outcome: a withdrawal that the cached (stale) balance
    // does not cover, but the stored one does, succeeds.
    cached
        .execute::<Account>(&id, AccountCommand::Withdraw { amount: 36 })
        .await
        .expect("withdraw everything");
    other
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 7 })
        .await
        .expect("deposit elsewhere");
    cached
        .execute::<Account>(&id, AccountCommand::Withdraw { amount: 7 })
        .await
        .expect("covered by the stored balance, not by the cached one");
    assert_eq!(stats(&cached), (3, 5, 1));
    let err = cached
        .execute::<Account>(&id, AccountCommand::Withdraw { amount: 1 })
        .await
        .expect_err("nothing left");
    assert_eq!(err.code(), Some("INSUFFICIENT_FUNDS"));

    // Concurrently: cached and uncached writers on the same account.
    const PER_TASK: i64 = 10;
    let barrier = Arc::new(Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let repo = if task % 2 == 0 {
                cached.clone()
            } else {
                other.clone()
            };
            let (barrier, id) = (barrier.clone(), id.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                for _ in 0..PER_TASK {
                    repo.execute::<Account>(&id, AccountCommand::Deposit { amount: 1 })
                        .await
                        .expect("execute retries until it wins");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    cached
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 100 })
        .await
        .expect("deposit after the race");

    let loaded = store.load::<Account>(&id).await.expect("load");
    let expected_deposits = 5 + 8 * PER_TASK as u64 + 1;
    assert_eq!(
        loaded.version,
        1 + expected_deposits + 2,
        "and two withdrawals"
    );
    assert_eq!(loaded.aggregate.deposits, expected_deposits);
    assert_eq!(loaded.aggregate.balance, 8 * PER_TASK + 100);
    let sequences: Vec<u64> = store
        .read_stream::<Account>(&id, 0)
        .await
        .expect("read")
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, (1..=loaded.version).collect::<Vec<_>>());
}

/// Correlation id, causation id and headers survive the store.
pub async fn metadata_round_trip<S: EventStore>(store: S) {
    let id = new_id();
    let metadata = Metadata::new()
        .with_correlation_id(Uuid::new_v4())
        .with_causation_id(Uuid::new_v4())
        .with_header("user", "alice")
        .with_header("tenant", "ünïcødé \"quoted\"");
    let stored = store
        .append::<Account>(&id, 0, deposits(&[1, 2]), &metadata)
        .await
        .expect("append");
    assert!(stored.iter().all(|e| e.metadata == metadata));

    let read = store.read_stream::<Account>(&id, 0).await.expect("read");
    assert!(read.iter().all(|e| e.metadata == metadata));

    let all = read_all_of(&store, &[id.as_str()]).await;
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|e| e.metadata == metadata));

    let plain = new_id();
    let stored = store
        .append::<Account>(&plain, 0, deposits(&[1]), &Metadata::default())
        .await
        .expect("append");
    let read = store.read_stream::<Account>(&plain, 0).await.expect("read");
    assert_eq!(read[0].metadata, Metadata::default());
    assert_eq!(read, stored);
}

/// `read_all` returns every event once, in global order, and pages with
/// `after_position` and `limit`.
pub async fn read_all_in_global_order<S: EventStore>(store: S) {
    let ids = [new_id(), new_id(), new_id()];
    let mut appended = Vec::new();
    for round in 0..4 {
        for (i, id) in ids.iter().enumerate() {
            let stored = store
                .append::<Account>(
                    id,
                    round * 2,
                    deposits(&[i as i64, round as i64]),
                    &Metadata::default(),
                )
                .await
                .expect("append");
            appended.extend(stored.into_iter().map(|e| e.position));
        }
    }
    let ids_ref: Vec<&str> = ids.iter().map(String::as_str).collect();
    let all = read_all_of(&store, &ids_ref).await;
    assert_eq!(all.len(), 24);
    assert_eq!(all.iter().map(|e| e.position).collect::<Vec<_>>(), appended);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    for id in &ids {
        let sequences: Vec<u64> = all
            .iter()
            .filter(|e| &e.aggregate_id == id)
            .map(|e| e.sequence)
            .collect();
        assert_eq!(sequences, (1..=8).collect::<Vec<_>>());
    }

    // Paging from just before our first event with a small limit sees the same events.
    let mut paged = Vec::new();
    let mut after = appended[0] - 1;
    loop {
        let page = store.read_all(after, 5).await.expect("read page");
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        after = last.position;
        paged.extend(
            page.into_iter()
                .filter(|e| ids.contains(&e.aggregate_id))
                .map(|e| e.position),
        );
    }
    assert_eq!(paged, appended);
}

/// `read_stream` starts after the given sequence; streams are keyed by type and id.
pub async fn streams_are_isolated<S: EventStore>(store: S) {
    let id = new_id();
    store
        .append::<Account>(&id, 0, deposits(&[1, 2, 3]), &Metadata::default())
        .await
        .expect("append account");
    let notes = store
        .append::<Note>(
            &id,
            0,
            vec![WrittenEvent {
                text: "same id, other type".into(),
            }
            .into()],
            &Metadata::default(),
        )
        .await
        .expect("a note with the same id is another stream");
    assert_eq!(notes[0].sequence, 1);
    assert_eq!(notes[0].aggregate_type, "conformance_note");

    let tail = store.read_stream::<Account>(&id, 2).await.expect("read");
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].sequence, 3);
    assert_eq!(tail[0].event, deposits(&[3])[0]);
    assert!(store
        .read_stream::<Account>(&id, 3)
        .await
        .expect("read")
        .is_empty());
    assert!(store
        .read_stream::<Account>(&new_id(), 0)
        .await
        .expect("read")
        .is_empty());

    let note = store.load::<Note>(&id).await.expect("load note");
    assert_eq!(
        (note.version, note.aggregate.text.as_str()),
        (1, "same id, other type")
    );

    let all = read_all_of(&store, &[id.as_str()]).await;
    let decoded: Result<Vec<EventEnvelope<AccountEvent>>, Error> = all
        .iter()
        .filter(|e| e.aggregate_type == "conformance_account")
        .map(EventEnvelope::decode)
        .collect();
    assert_eq!(decoded.expect("decode").len(), 3);
    let err = all
        .iter()
        .find(|e| e.aggregate_type == "conformance_note")
        .expect("the note is in the global log")
        .decode::<AccountEvent>()
        .expect_err("a note is not an account event");
    assert!(matches!(err, Error::UnknownEventType { .. }), "{err:?}");
}

/// Appending no events stores nothing, even with a wrong expected version.
pub async fn empty_append_is_a_no_op<S: EventStore>(store: S) {
    let id = new_id();
    let stored = store
        .append::<Account>(&id, 0, Vec::new(), &Metadata::default())
        .await
        .expect("empty append");
    assert!(stored.is_empty());
    assert_eq!(store.load::<Account>(&id).await.expect("load").version, 0);
}

/// Checkpoints are stored per name and overwritten.
pub async fn checkpoints<S: CheckpointStore>(store: S) {
    let name = format!("projection-{}", Uuid::new_v4());
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), None);
    store.save_checkpoint(&name, 42).await.expect("save");
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), Some(42));
    store.save_checkpoint(&name, 43).await.expect("save again");
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), Some(43));
    let other = format!("projection-{}", Uuid::new_v4());
    assert_eq!(store.load_checkpoint(&other).await.expect("load"), None);
}

/// A command executed under a key stores its events once: a retry gets the same events
/// back (`Once::Replayed`) and stores nothing, the events carry the key in their
/// metadata, and another command (or another aggregate) under the used key is refused.
pub async fn command_id_executes_once<S: EventStore>(store: S) {
    let repo = Repository::new(store);
    let id = new_id();
    repo.execute::<Account>(&id, AccountCommand::Open)
        .await
        .expect("open");
    let key = CommandId::random();
    let deposit = AccountCommand::Deposit { amount: 10 };

    let first = repo
        .execute_once::<Account>(&id, key.clone(), deposit.clone())
        .await
        .expect("first execution");
    let Once::Stored(stored) = first else {
        panic!("the first execution stores: {first:?}")
    };
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].metadata.command_id.as_ref(), Some(&key));
    assert_eq!(
        repo.store()
            .read_stream::<Account>(&id, 0)
            .await
            .expect("read")[1..],
        stored[..],
        "the returned events are the stored ones"
    );

    for _ in 0..3 {
        let retry = repo
            .execute_once::<Account>(&id, key.clone(), deposit.clone())
            .await
            .expect("retry");
        assert_eq!(retry, Once::Replayed(stored.clone()));
    }
    // Through `execute_with` and the metadata, too.
    let via_metadata = repo
        .execute_with::<Account>(
            &id,
            deposit.clone(),
            &Metadata::new().with_command_id(key.clone()),
        )
        .await
        .expect("retry through metadata");
    assert_eq!(via_metadata, stored);

    let other = repo
        .execute_once::<Account>(&id, key.clone(), AccountCommand::Deposit { amount: 11 })
        .await
        .expect_err("another command under a used key");
    assert!(
        matches!(&other, Error::CommandIdReused { command_id, aggregate_id, .. }
            if command_id == key.as_str() && aggregate_id == &id),
        "{other:?}"
    );
    let elsewhere = new_id();
    let err = repo
        .execute_once::<Account>(&elsewhere, key.clone(), deposit.clone())
        .await
        .expect_err("the same key on another aggregate");
    assert!(matches!(err, Error::CommandIdReused { .. }), "{err:?}");

    let loaded = repo.load::<Account>(&id).await.expect("load");
    assert_eq!((loaded.version, loaded.aggregate.balance), (2, 10));
    assert_eq!(
        repo.load::<Account>(&elsewhere)
            .await
            .expect("load")
            .version,
        0
    );

    // The store's own API: a key that is recorded wins over the expected version.
    let again = repo
        .store()
        .append_once::<Account>(
            &id,
            0,
            deposits(&[10]),
            &Metadata::new().with_command_id(key.clone()),
            &CommandKey::new(key.clone(), &deposit),
        )
        .await
        .expect("append_once of a recorded key");
    assert_eq!(again, Once::Replayed(stored));
    assert_eq!(repo.load::<Account>(&id).await.expect("load").version, 2);
}

/// One key has one outcome: a rejected command is recorded, and its retry is rejected
/// the same way even after the state changed (a new attempt needs a new key); a command
/// that decides on no events is recorded as such. At the store's level, the first
/// record of a key stands: events appended under a key recorded as rejected are not
/// stored (an earlier attempt still in flight when a retry was rejected), and a
/// rejection recorded after the events were stored gives those events back.
pub async fn command_id_outcome_is_final<S: EventStore>(store: S) {
    let repo = Repository::new(store);
    let id = new_id();
    let key = CommandId::random();
    let withdraw = AccountCommand::Withdraw { amount: 5 };
    let err = repo
        .execute_once::<Account>(&id, key.clone(), withdraw.clone())
        .await
        .expect_err("insufficient funds");
    assert_eq!(err.code(), Some("INSUFFICIENT_FUNDS"));
    repo.execute::<Account>(&id, AccountCommand::Deposit { amount: 5 })
        .await
        .expect("deposit");
    let replayed = repo
        .execute_once::<Account>(&id, key.clone(), withdraw.clone())
        .await
        .expect_err("the rejection is replayed");
    assert_eq!(replayed.code(), Some("INSUFFICIENT_FUNDS"));
    assert_eq!(repo.load::<Account>(&id).await.expect("load").version, 1);
    let fresh = repo
        .execute_once::<Account>(&id, CommandId::random(), withdraw.clone())
        .await
        .expect("a new key decides again");
    assert!(!fresh.is_replayed());

    let no_op_key = CommandId::random();
    let no_op = || AccountCommand::DepositMany {
        amounts: Vec::new(),
    };
    let first = repo
        .execute_once::<Account>(&id, no_op_key.clone(), no_op())
        .await
        .expect("no events");
    assert_eq!(first, Once::Stored(Vec::new()));
    let again = repo
        .execute_once::<Account>(&id, no_op_key, no_op())
        .await
        .expect("no events, replayed");
    assert_eq!(again, Once::Replayed(Vec::new()));
    assert_eq!(repo.load::<Account>(&id).await.expect("load").version, 2);

    // The store's API: a rejection recorded first wins over a later append of events...
    let store = repo.store();
    let raced = CommandKey::new(CommandId::random(), &withdraw);
    let rejection = Rejection {
        code: Some("INSUFFICIENT_FUNDS".to_owned()),
        message: None,
    };
    let recorded = store
        .record_command::<Account>(&id, 2, &raced, Some(&rejection))
        .await
        .expect("record the rejection");
    assert_eq!(recorded, None, "recorded now");
    let late = store
        .append_once::<Account>(
            &id,
            2,
            vec![WithdrawnEvent { amount: 5 }.into()],
            &Metadata::new(),
            &raced,
        )
        .await
        .expect_err("the recorded rejection stands");
    assert_eq!(late.code(), Some("INSUFFICIENT_FUNDS"));
    assert_eq!(repo.load::<Account>(&id).await.expect("load").version, 2);

    // ...and events stored first win over a later rejection.
    let stored_first = CommandKey::new(CommandId::random(), &withdraw);
    let Once::Stored(stored) = store
        .append_once::<Account>(&id, 2, deposits(&[1]), &Metadata::new(), &stored_first)
        .await
        .expect("append")
    else {
        panic!("the first record stores")
    };
    let recorded = store
        .record_command::<Account>(&id, 2, &stored_first, Some(&rejection))
        .await
        .expect("record after the events");
    assert_eq!(recorded, Some(Recorded::Stored(stored)));
}

/// Many concurrent executions of one key (each through its own repository, as separate
/// processes would), racing with plain commands on the same aggregate: exactly one
/// stores, the others get its events back, and the deposit lands once.
pub async fn command_id_concurrent_executions<S: EventStore + 'static>(store: S) {
    const SAME_KEY: usize = 8;
    const PLAIN: i64 = 4;
    let store = Arc::new(store);
    let id = new_id();
    Repository::new(store.clone())
        .execute::<Account>(&id, AccountCommand::Open)
        .await
        .expect("open");
    let key = CommandId::random();

    let barrier = Arc::new(Barrier::new(SAME_KEY + PLAIN as usize));
    let keyed: Vec<_> = (0..SAME_KEY)
        .map(|_| {
            let (store, barrier, id, key) =
                (store.clone(), barrier.clone(), id.clone(), key.clone());
            tokio::spawn(async move {
                let repo = Repository::new(store).with_max_attempts(100);
                barrier.wait().await;
                repo.execute_once::<Account>(&id, key, AccountCommand::Deposit { amount: 100 })
                    .await
            })
        })
        .collect();
    let plain: Vec<_> = (1..=PLAIN)
        .map(|amount| {
            let (store, barrier, id) = (store.clone(), barrier.clone(), id.clone());
            tokio::spawn(async move {
                let repo = Repository::new(store).with_max_attempts(100);
                barrier.wait().await;
                repo.execute::<Account>(&id, AccountCommand::Deposit { amount })
                    .await
            })
        })
        .collect();

    let mut outcomes = Vec::new();
    for task in keyed {
        outcomes.push(task.await.expect("task").expect("keyed execution"));
    }
    for task in plain {
        task.await.expect("task").expect("plain execution");
    }
    let stored: Vec<_> = outcomes.iter().filter(|o| !o.is_replayed()).collect();
    assert_eq!(
        stored.len(),
        1,
        "exactly one execution stores: {outcomes:?}"
    );
    for outcome in &outcomes {
        assert_eq!(outcome.events(), stored[0].events());
    }
    let loaded = Repository::new(store.clone())
        .load::<Account>(&id)
        .await
        .expect("load");
    assert_eq!(loaded.version, 1 + 1 + PLAIN as u64);
    assert_eq!(loaded.aggregate.balance, 100 + (1..=PLAIN).sum::<i64>());
}

/// The first execution's answer is lost (the store committed, the caller saw an error,
/// as when a connection drops after the commit): the retry, through another repository,
/// gets the stored events back without deciding again, although deciding again would now
/// be rejected (the withdrawal emptied the account).
pub async fn command_id_lost_acknowledgement<S: EventStore + 'static>(store: S) {
    let store = Arc::new(store);
    let id = new_id();
    let repo = Repository::new(store.clone());
    repo.execute::<Account>(&id, AccountCommand::Deposit { amount: 10 })
        .await
        .expect("deposit");

    let key = CommandId::random();
    let withdraw = AccountCommand::Withdraw { amount: 10 };
    let losing = Repository::new(LosesAcknowledgements {
        inner: store.clone(),
        lose: AtomicBool::new(true),
    });
    let err = losing
        .execute_once::<Account>(&id, key.clone(), withdraw.clone())
        .await
        .expect_err("the acknowledgement is lost");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    let after_loss = repo.load::<Account>(&id).await.expect("load");
    assert_eq!(
        (after_loss.version, after_loss.aggregate.balance),
        (2, 0),
        "the lost execution was stored"
    );

    let retry = repo
        .execute_once::<Account>(&id, key.clone(), withdraw)
        .await
        .expect("the retry is answered from the record");
    let Once::Replayed(events) = retry else {
        panic!("the retry must not store: {retry:?}")
    };
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].sequence, 2);
    assert_eq!(repo.load::<Account>(&id).await.expect("load").version, 2);
}

/// A store whose `append_once` commits and then reports a lost connection, once.
struct LosesAcknowledgements<S> {
    inner: S,
    lose: AtomicBool,
}

impl<S: EventStore> EventStore for LosesAcknowledgements<S> {
    fn load<A: Aggregate>(
        &self,
        id: &A::Id,
    ) -> impl Future<Output = Result<Loaded<A>, Error>> + Send {
        self.inner.load(id)
    }

    fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<A::Event>>, Error>> + Send {
        self.inner
            .append::<A>(id, expected_version, events, metadata)
    }

    fn find_command<A: Aggregate>(
        &self,
        id: &A::Id,
        key: &CommandKey,
    ) -> impl Future<Output = Result<Option<Recorded<A::Event>>, Error>> + Send {
        self.inner.find_command::<A>(id, key)
    }

    fn record_command<A: Aggregate>(
        &self,
        id: &A::Id,
        version: u64,
        key: &CommandKey,
        rejection: Option<&Rejection>,
    ) -> impl Future<Output = Result<Option<Recorded<A::Event>>, Error>> + Send {
        self.inner.record_command::<A>(id, version, key, rejection)
    }

    async fn append_once<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
        key: &CommandKey,
    ) -> Result<Once<A::Event>, Error> {
        let outcome = self
            .inner
            .append_once::<A>(id, expected_version, events, metadata, key)
            .await?;
        if self.lose.swap(false, Ordering::SeqCst) {
            return Err(Error::store(
                "appending events",
                "connection reset after the commit",
            ));
        }
        Ok(outcome)
    }

    fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<A::Event>>, Error>> + Send {
        self.inner.read_stream::<A>(id, after_sequence)
    }

    fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<RawEvent>>, Error>> + Send {
        self.inner.read_all(after_position, limit)
    }
}

/// Reads the whole global log and keeps the events of `ids`.
async fn read_all_of<S: EventStore>(
    store: &S,
    ids: &[&str],
) -> Vec<EventEnvelope<thalo::RawEvent>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_all(after, 1000).await.expect("read all");
        let Some(last) = page.last() else { return out };
        after = last.position;
        out.extend(
            page.into_iter()
                .filter(|e| ids.contains(&e.aggregate_id.as_str())),
        );
    }
}

/// Expands to one `#[tokio::test]` per conformance check. The argument is the path of an
/// async function (or closure) that returns a fresh store handle.
#[macro_export]
macro_rules! store_conformance_tests {
    ($new_store:expr) => {
        $crate::store_conformance_tests!(@tests $new_store;
            append_and_load,
            expected_version_conflict,
            concurrent_appends_one_wins,
            execute_retries_on_conflict,
            cached_execute_detects_stale_entries,
            metadata_round_trip,
            read_all_in_global_order,
            streams_are_isolated,
            empty_append_is_a_no_op,
            checkpoints,
            command_id_executes_once,
            command_id_outcome_is_final,
            command_id_concurrent_executions,
            command_id_lost_acknowledgement,
        );
    };
    (@tests $new_store:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                $crate::conformance::$name(($new_store)().await).await;
            }
        )*
    };
}
