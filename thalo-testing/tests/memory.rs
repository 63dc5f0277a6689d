//! The in-memory store against the conformance suite, and the in-process subscription.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thalo::{
    Aggregate, CheckpointStore, Error, EventEnvelope, EventHandler, EventStore, InMemoryEventStore,
    Metadata, Projection, Repository, Subscription,
};
use thalo_testing::conformance::{Account, AccountCommand, AccountEvent, DepositedEvent};

async fn new_store() -> InMemoryEventStore {
    InMemoryEventStore::new()
}

thalo_testing::store_conformance_tests!(new_store);

/// Records what it sees; fails on the deposit equal to `fail_on`.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, u64, u64)>>,
    fail_on: AtomicU64,
    calls: AtomicUsize,
}

impl EventHandler<AccountEvent> for Recorder {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let AccountEvent::Deposited(DepositedEvent { amount }) = envelope.event {
            if amount as u64 == self.fail_on.load(Ordering::SeqCst) {
                return Err(Error::invariant("TEST_FAILURE", "told to fail"));
            }
        }
        self.seen.lock().expect("lock").push((
            envelope.aggregate_id.clone(),
            envelope.sequence,
            envelope.position,
        ));
        Ok(())
    }
}

impl Projection<AccountEvent> for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
}

async fn deposit(repo: &Repository<InMemoryEventStore>, id: &str, amount: i64) {
    repo.execute::<Account>(&id.to_string(), AccountCommand::Deposit { amount })
        .await
        .expect("deposit");
}

#[tokio::test]
async fn subscription_catches_up_resumes_from_its_checkpoint_and_skips_other_types() {
    let store = InMemoryEventStore::new();
    let repo = Repository::new(store.clone());
    deposit(&repo, "a", 1).await;
    deposit(&repo, "b", 2).await;
    repo.store()
        .append::<thalo_testing::conformance::Note>(
            &"a".to_string(),
            0,
            vec![thalo_testing::conformance::WrittenEvent { text: "x".into() }.into()],
            &Metadata::default(),
        )
        .await
        .expect("note");
    deposit(&repo, "a", 3).await;

    let mut sub =
        Subscription::new::<Account>(store.clone(), Recorder::default()).with_batch_size(2);
    assert_eq!(sub.catch_up().await.expect("catch up"), 3);
    assert_eq!(
        *sub.projection().seen.lock().expect("lock"),
        [("a".into(), 1, 1), ("b".into(), 1, 2), ("a".into(), 2, 4)]
    );
    assert_eq!(
        store.load_checkpoint("recorder").await.expect("checkpoint"),
        Some(4)
    );

    // A new subscription with the same name starts after the checkpoint.
    deposit(&repo, "b", 4).await;
    let mut again = Subscription::new::<Account>(store.clone(), Recorder::default());
    assert_eq!(again.catch_up().await.expect("catch up"), 1);
    assert_eq!(
        *again.projection().seen.lock().expect("lock"),
        [("b".into(), 2, 5)]
    );
}

#[tokio::test]
async fn a_failing_projection_stops_before_the_failing_event_and_retries_it() {
    let store = InMemoryEventStore::new();
    let repo = Repository::new(store.clone());
    for amount in 1..=5 {
        deposit(&repo, "a", amount).await;
    }
    let recorder = Recorder::default();
    recorder.fail_on.store(3, Ordering::SeqCst);
    let mut sub = Subscription::new::<Account>(store.clone(), recorder);
    let err = sub.catch_up().await.expect_err("the projection fails");
    assert!(
        matches!(err, Error::Handler { ref handler, .. } if handler == "recorder"),
        "{err:?}"
    );
    assert_eq!(
        store.load_checkpoint("recorder").await.expect("checkpoint"),
        Some(2)
    );

    sub.projection().fail_on.store(0, Ordering::SeqCst);
    assert_eq!(sub.catch_up().await.expect("catch up"), 3);
    let sequences: Vec<u64> = sub
        .projection()
        .seen
        .lock()
        .expect("lock")
        .iter()
        .map(|s| s.1)
        .collect();
    assert_eq!(
        sequences,
        [1, 2, 3, 4, 5],
        "every event exactly once, in order"
    );
}

#[tokio::test]
async fn run_follows_new_events_until_shutdown() {
    let store = InMemoryEventStore::new();
    let repo = Repository::new(store.clone());
    let projection = Arc::new(Recorder::default());
    let stop = thalo::Shutdown::new();
    let sub = Subscription::new::<Account>(store.clone(), projection.clone())
        .with_poll_interval(Duration::from_secs(30));
    let progress = sub.progress();
    let task = tokio::spawn(sub.run(stop.clone()));

    let mut stored = Vec::new();
    for amount in 1..=3 {
        stored.extend(
            repo.execute::<Account>(&"live".to_owned(), AccountCommand::Deposit { amount })
                .await
                .expect("deposit"),
        );
    }
    // Woken by the store, not by the 30 s poll.
    progress
        .wait_until_projected(&stored, Duration::from_secs(5))
        .await
        .expect("the subscription follows new events");
    let expected: Vec<(String, u64, u64)> = stored
        .iter()
        .map(|e| ("live".to_owned(), e.sequence, e.position))
        .collect();
    assert_eq!(*projection.seen.lock().expect("lock"), expected);

    stop.trigger();
    task.await.expect("task").expect("clean shutdown");
    assert_eq!(projection.calls.load(Ordering::SeqCst), 3);
}

/// A store where another writer deposits 100 right after each of the first `races` loads.
#[derive(Clone)]
struct RacyStore {
    inner: InMemoryEventStore,
    races: Arc<AtomicUsize>,
}

impl EventStore for RacyStore {
    async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<thalo::Loaded<A>, Error> {
        let loaded = self.inner.load::<A>(id).await?;
        if self.races.load(Ordering::SeqCst) > 0 {
            self.races.fetch_sub(1, Ordering::SeqCst);
            let other = self.inner.load::<Account>(&id.to_string()).await?;
            self.inner
                .append::<Account>(
                    &id.to_string(),
                    other.version,
                    vec![DepositedEvent { amount: 100 }.into()],
                    &Metadata::default(),
                )
                .await?;
        }
        Ok(loaded)
    }

    async fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.inner
            .append::<A>(id, expected_version, events, metadata)
            .await
    }

    async fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after: u64,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.inner.read_stream::<A>(id, after).await
    }

    async fn read_all(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope<thalo::RawEvent>>, Error> {
        self.inner.read_all(after, limit).await
    }
}

#[tokio::test]
async fn execute_retries_a_conflict_on_fresh_state_and_gives_up_after_max_attempts() {
    let id = "racy".to_string();

    // Two races, three attempts: the third attempt wins, decided on the latest state.
    let store = RacyStore {
        inner: InMemoryEventStore::new(),
        races: Arc::new(AtomicUsize::new(2)),
    };
    let repo = Repository::new(store.clone()).with_max_attempts(3);
    let stored = repo
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 1 })
        .await
        .expect("third attempt wins");
    assert_eq!(stored[0].sequence, 3, "appended after both racing deposits");
    let account = repo.load::<Account>(&id).await.expect("load");
    assert_eq!((account.aggregate.balance, account.version), (201, 3));

    // One attempt only: the conflict is returned and nothing of ours is stored.
    let store = RacyStore {
        inner: InMemoryEventStore::new(),
        races: Arc::new(AtomicUsize::new(1)),
    };
    let repo = Repository::new(store.clone()).with_max_attempts(1);
    let err = repo
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 1 })
        .await
        .expect_err("conflict");
    assert!(err.is_conflict());
    assert_eq!(
        err.to_string(),
        "concurrency conflict on conformance_account `racy`: expected version 0, found 1"
    );
    let account = store.inner.load::<Account>(&id).await.expect("load");
    assert_eq!((account.aggregate.balance, account.version), (100, 1));
}

#[tokio::test]
async fn commands_that_produce_nothing_store_nothing_and_rejections_are_returned() {
    let store = InMemoryEventStore::new();
    let repo = Repository::new(store.clone());
    let id = "quiet".to_string();
    let stored = repo
        .execute::<Account>(&id, AccountCommand::DepositMany { amounts: vec![] })
        .await
        .expect("no events");
    assert!(stored.is_empty());
    assert!(store.is_empty());

    let err = repo
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 0 })
        .await
        .expect_err("rejected");
    assert_eq!(err.code(), Some("NON_POSITIVE_AMOUNT"));
    assert!(err.is_rejection());
    assert!(store.is_empty());

    let missing = repo.get::<Account>(&id).await.expect_err("not found");
    assert!(matches!(missing, Error::NotFound { .. }), "{missing:?}");

    repo.execute::<Account>(&id, AccountCommand::Open)
        .await
        .expect("open");
    let loaded = repo.get::<Account>(&id).await.expect("found");
    assert!(loaded.aggregate.opened);
    assert_eq!(loaded.aggregate, {
        let mut a = Account::new(id.clone());
        a.apply(thalo_testing::conformance::OpenedEvent {}.into());
        a
    });
}

/// A store whose next append is written but reported as failed (a connection lost after
/// the commit: the outcome is unknown to the caller).
#[derive(Clone, Default)]
struct LostAckStore {
    inner: InMemoryEventStore,
    lose_next_ack: Arc<AtomicUsize>,
}

impl EventStore for LostAckStore {
    async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<thalo::Loaded<A>, Error> {
        self.inner.load::<A>(id).await
    }

    async fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        let stored = self
            .inner
            .append::<A>(id, expected_version, events, metadata)
            .await?;
        if self.lose_next_ack.swap(0, Ordering::SeqCst) > 0 {
            return Err(Error::store("committing", "connection reset"));
        }
        Ok(stored)
    }

    async fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after: u64,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.inner.read_stream::<A>(id, after).await
    }

    async fn read_all(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope<thalo::RawEvent>>, Error> {
        self.inner.read_all(after, limit).await
    }
}

#[tokio::test]
async fn cache_drops_an_aggregate_whose_append_failed() {
    let store = LostAckStore::default();
    let repo = Repository::new(store.clone()).with_cache(8);
    let id = "lost-ack".to_string();
    repo.execute::<Account>(&id, AccountCommand::Open)
        .await
        .expect("open");
    repo.execute::<Account>(&id, AccountCommand::Deposit { amount: 1 })
        .await
        .expect("deposit");

    store.lose_next_ack.store(1, Ordering::SeqCst);
    let err = repo
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 2 })
        .await
        .expect_err("the store reported a failure");
    assert!(!err.is_conflict(), "{err}");
    let stats = repo.cache_stats().expect("cache");
    assert_eq!((stats.hits, stats.misses, stats.entries), (2, 1, 0));

    // The deposit of 2 was in fact stored: the next command reloads and sees it.
    repo.execute::<Account>(&id, AccountCommand::Deposit { amount: 4 })
        .await
        .expect("deposit after the failure");
    let stats = repo.cache_stats().expect("cache");
    assert_eq!((stats.hits, stats.misses, stats.stale), (2, 2, 0));
    let account = repo.load::<Account>(&id).await.expect("load");
    assert_eq!((account.aggregate.balance, account.version), (7, 4));

    repo.clear_cache();
    assert_eq!(repo.cache_stats().expect("cache").entries, 0);
    assert_eq!(repo.cache_capacity(), Some(8));
    assert_eq!(Repository::new(store).cache_stats(), None);
}

/// The in-memory store forgets command keys after its retention, as Postgres does, and
/// `prune_commands` frees the expired ones.
#[tokio::test]
async fn in_memory_command_keys_expire_after_the_retention() {
    let store = InMemoryEventStore::new().with_command_retention(Duration::from_millis(100));
    let repo = Repository::new(store.clone());
    let key = thalo::CommandId::random();
    let deposit = || AccountCommand::Deposit { amount: 3 };
    let first = repo
        .execute_once::<Account>(&"a".to_owned(), key.clone(), deposit())
        .await
        .expect("first");
    let retry = repo
        .execute_once::<Account>(&"a".to_owned(), key.clone(), deposit())
        .await
        .expect("retry");
    assert_eq!(retry, thalo::Once::Replayed(first.into_events()));

    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(store.prune_commands(), 1);
    let again = repo
        .execute_once::<Account>(&"a".to_owned(), key, deposit())
        .await
        .expect("after the retention");
    assert!(!again.is_replayed());
    assert_eq!(store.len(), 2);
}

mod domain {
    use thalo::{commands, events, Aggregate};

    #[derive(Debug, PartialEq, thiserror::Error)]
    pub enum LockError {
        #[error("the lock is jammed")]
        Jammed,
    }

    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Lock {
        #[identity]
        pub id: String,
    }

    #[commands]
    impl Lock {
        pub fn open(&self) -> Result<OpenedEvent, LockError> {
            Err(LockError::Jammed)
        }
    }

    #[events]
    impl Lock {
        pub fn opened(&mut self) {}
    }
}

/// A rejection with the aggregate's own error type: the first execution returns it as
/// is (downcastable), a retry under the key gets its text back as a `ReplayedRejection`.
#[tokio::test]
async fn a_replayed_domain_error_keeps_its_text() {
    use domain::{Lock, LockCommand, LockError};
    let repo = Repository::new(InMemoryEventStore::new());
    let key = thalo::CommandId::random();
    let first = repo
        .execute_once::<Lock>(&"front".to_owned(), key.clone(), LockCommand::Open)
        .await
        .expect_err("jammed");
    assert_eq!(
        first.downcast_domain::<LockError>(),
        Some(&LockError::Jammed)
    );
    let replayed = repo
        .execute_once::<Lock>(&"front".to_owned(), key, LockCommand::Open)
        .await
        .expect_err("jammed, replayed");
    let text = replayed
        .downcast_domain::<thalo::ReplayedRejection>()
        .expect("a replayed rejection");
    assert_eq!(text.message, "the lock is jammed");
    assert_eq!(replayed.to_string(), first.to_string());
}
