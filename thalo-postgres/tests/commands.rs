//! Idempotent commands against a real Postgres, beyond the conformance suite: a retry
//! from another process (a new pool), the record's retention and pruning, and the
//! outbox rows of a keyed append.

mod common;

use std::time::Duration;

use common::{new_id, Account, AccountCommand};
use thalo::{CommandId, Error, EventStore, Once, Repository};
use thalo_postgres::PgEventStore;

/// A retry after a restart: another pool and store on the same schema (a new process)
/// recognises the key and stores nothing.
#[tokio::test]
async fn a_retry_from_a_restarted_process_is_recognised() {
    let db = common::store().await;
    let id = new_id();
    let key = CommandId::random();
    let first = Repository::new(db.store.clone())
        .execute_once::<Account>(&id, key.clone(), AccountCommand::Deposit { amount: 7 })
        .await
        .expect("first execution");
    assert!(!first.is_replayed());

    let restarted = PgEventStore::builder(common::pool(2).await)
        .schema(&db.schema)
        .build()
        .expect("store");
    let retry = Repository::new(restarted)
        .execute_once::<Account>(&id, key, AccountCommand::Deposit { amount: 7 })
        .await
        .expect("retry");
    assert_eq!(retry, Once::Replayed(first.into_events()));
    let loaded = db.store.load::<Account>(&id).await.expect("load");
    assert_eq!((loaded.version, loaded.aggregate.balance), (1, 7));
}

/// Each keyed append writes its outbox rows like any append; a replay writes none, and
/// the key's record sits in the `commands` table with the events' sequences.
#[tokio::test]
async fn a_keyed_append_writes_the_outbox_and_its_record() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    let id = new_id();
    let key = CommandId::new("client-7/deposit-1").expect("key");
    for _ in 0..3 {
        repo.execute_once::<Account>(&id, key.clone(), AccountCommand::Deposit { amount: 1 })
            .await
            .expect("execute");
    }
    let outbox: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("outbox")))
        .fetch_one(&db.pool)
        .await
        .expect("outbox");
    assert_eq!(outbox, 1);
    let record: (String, String, i64, i64) = sqlx::query_as(&format!(
        "SELECT command_id, aggregate_id, first_sequence, last_sequence FROM {}",
        db.table("commands")
    ))
    .fetch_one(&db.pool)
    .await
    .expect("one record");
    assert_eq!(record, (key.to_string(), id, 1, 1));
}

/// A key older than the retention is forgotten: executing it again executes the
/// command again; `prune_commands` deletes expired records and keeps the others.
#[tokio::test]
async fn expired_keys_are_forgotten_and_pruned() {
    let db = common::store_with(4, |b| b.command_retention(Duration::from_millis(300))).await;
    let repo = Repository::new(db.store.clone());
    let id = new_id();
    let key = CommandId::random();
    let deposit = || AccountCommand::Deposit { amount: 5 };
    repo.execute_once::<Account>(&id, key.clone(), deposit())
        .await
        .expect("first");
    assert!(repo
        .execute_once::<Account>(&id, key.clone(), deposit())
        .await
        .expect("retry within the retention")
        .is_replayed());

    tokio::time::sleep(Duration::from_millis(400)).await;
    let again = repo
        .execute_once::<Account>(&id, key.clone(), deposit())
        .await
        .expect("after the retention");
    assert!(!again.is_replayed(), "an expired key executes again");
    assert_eq!(again.events()[0].sequence, 2);
    // The record was overwritten by the new execution: a different command now
    // conflicts with it.
    let err = repo
        .execute_once::<Account>(&id, key.clone(), AccountCommand::Deposit { amount: 6 })
        .await
        .expect_err("reused");
    assert!(matches!(err, Error::CommandIdReused { .. }), "{err:?}");

    let fresh = CommandId::random();
    tokio::time::sleep(Duration::from_millis(400)).await;
    repo.execute_once::<Account>(&id, fresh, deposit())
        .await
        .expect("a fresh key");
    assert_eq!(db.store.prune_commands().await.expect("prune"), 1);
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("commands")))
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(left, 1, "the fresh key's record stays");
}

/// A store without an outbox (no relay) stores every kind of append and writes no
/// outbox row: plain, keyed, in the caller's transaction, group-committed.
#[tokio::test]
async fn a_store_without_an_outbox_writes_no_outbox_rows() {
    let db = common::store_with(4, |b| b.outbox(false)).await;
    assert!(!db.store.has_outbox());
    let group = thalo_postgres::PgEventStore::builder(db.pool.clone())
        .schema(&db.schema)
        .outbox(false)
        .group_commit(thalo_postgres::GroupCommit::default())
        .build()
        .expect("store");
    let id = new_id();
    let repo = Repository::new(db.store.clone());
    repo.execute::<Account>(&id, AccountCommand::Deposit { amount: 1 })
        .await
        .expect("plain");
    repo.execute_once::<Account>(
        &id,
        CommandId::random(),
        AccountCommand::Deposit { amount: 2 },
    )
    .await
    .expect("keyed");
    Repository::new(group)
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 3 })
        .await
        .expect("group-committed");
    let mut tx = db.pool.begin().await.expect("begin");
    db.store
        .append_in::<Account>(
            &mut tx,
            &id,
            3,
            common::deposits([4]),
            &thalo::Metadata::new(),
        )
        .await
        .expect("append_in");
    tx.commit().await.expect("commit");

    let loaded = db.store.load::<Account>(&id).await.expect("load");
    assert_eq!((loaded.version, loaded.aggregate.balance), (4, 10));
    let outbox: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("outbox")))
        .fetch_one(&db.pool)
        .await
        .expect("outbox");
    assert_eq!(outbox, 0);
}

/// A library member whose borrowing is refused with a domain error that has a code.
mod coded {
    use thalo::{commands, events, Aggregate};

    #[derive(Debug, PartialEq, thiserror::Error, thalo::ErrorCode)]
    pub enum MemberError {
        #[error("the member is suspended")]
        #[code("MEMBER_SUSPENDED")]
        Suspended,
    }

    #[derive(Aggregate, Clone, Debug, Default)]
    #[aggregate(name = "pg_test_member")]
    pub struct Member {
        #[identity]
        id: String,
    }

    #[commands]
    impl Member {
        pub fn borrow(&self, suspended: bool) -> Result<BorrowedEvent, MemberError> {
            if suspended {
                return Err(MemberError::Suspended);
            }
            Ok(BorrowedEvent {})
        }
    }

    #[events]
    impl Member {
        pub fn borrowed(&mut self) {}
    }
}

/// A rejection with a coded domain error is recorded with its code: a retry under the
/// same key, from another process, gets the code and the text back (as
/// `Error::Invariant`: the store keeps the code and the text, not the error's type), and
/// the first execution's error is the domain error itself.
#[tokio::test]
async fn a_coded_domain_rejection_is_replayed_with_its_code() {
    use coded::{Member, MemberCommand, MemberError};

    let db = common::store().await;
    let id = new_id();
    let key = CommandId::random();
    let first = Repository::new(db.store.clone())
        .execute_once::<Member>(&id, key.clone(), MemberCommand::Borrow { suspended: true })
        .await
        .unwrap_err();
    assert_eq!(first.code(), Some("MEMBER_SUSPENDED"));
    assert_eq!(
        first.downcast_domain::<MemberError>(),
        Some(&MemberError::Suspended)
    );

    let restarted = PgEventStore::builder(common::pool(2).await)
        .schema(&db.schema)
        .build()
        .expect("store");
    // The retry would not be rejected if decided again: the first outcome stands.
    let retry = Repository::new(restarted)
        .execute_once::<Member>(&id, key, MemberCommand::Borrow { suspended: true })
        .await
        .unwrap_err();
    assert_eq!(retry.code(), Some("MEMBER_SUSPENDED"));
    assert!(retry.is_rejection());
    assert!(
        retry.to_string().contains("the member is suspended"),
        "{retry}"
    );
    let record: (bool, Option<String>) = sqlx::query_as(&format!(
        "SELECT rejected, rejection_code FROM {}",
        db.table("commands")
    ))
    .fetch_one(&db.pool)
    .await
    .expect("one record");
    assert_eq!(record, (true, Some("MEMBER_SUSPENDED".to_owned())));
    let none: Result<_, Error> = db.store.load::<Member>(&id).await;
    assert_eq!(none.expect("load").version, 0);
}
