//! Read-your-writes: `PgSubscription::progress` in the process that runs the
//! projection, and `PgEventStore::wait_until_projected` from anywhere (the checkpoints in
//! the store).

mod common;

use std::time::{Duration, Instant};

use common::{new_id, Account, AccountCommand, AccountEvent};
use sqlx::PgConnection;
use thalo::{Error, EventEnvelope, Repository, Shutdown};
use thalo_postgres::{PgProjection, PgSubscription};

/// Sums deposits per account into `<schema>.<table>`.
#[derive(Clone)]
struct Balances {
    table: String,
    version: u32,
}

impl Balances {
    async fn new(db: &common::TestDb, version: u32) -> Self {
        let table = db.table(&format!("ryw_balances_v{version}"));
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (account TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
        Balances { table, version }
    }

    async fn balance(&self, db: &common::TestDb, account: &str) -> Option<i64> {
        sqlx::query_scalar(&format!(
            "SELECT cents FROM {} WHERE account = $1",
            self.table
        ))
        .bind(account)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    }
}

impl PgProjection<AccountEvent> for Balances {
    fn name(&self) -> &str {
        "ryw_balances"
    }

    fn version(&self) -> u32 {
        self.version
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        let AccountEvent::Deposited(deposit) = &envelope.event;
        sqlx::query(&format!(
            "INSERT INTO {} AS b (account, cents) VALUES ($1, $2)
             ON CONFLICT (account) DO UPDATE SET cents = b.cents + EXCLUDED.cents",
            self.table
        ))
        .bind(&envelope.aggregate_id)
        .bind(deposit.amount)
        .execute(tx)
        .await
        .map_err(|e| Error::store("updating balances", e))?;
        Ok(())
    }
}

/// Every command is visible in the read model as soon as the wait returns, through the
/// subscription's progress handle and through the store's checkpoints alike, with no
/// sleep in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_visible_once_the_wait_returns() {
    let db = common::store().await;
    let projection = Balances::new(&db, 1).await;
    // A long idle timeout: only the store's notifications make the subscription quick.
    let subscription = PgSubscription::new::<Account>(db.store.clone(), projection.clone())
        .with_poll_interval(Duration::from_secs(30));
    let progress = subscription.progress();
    let shutdown = Shutdown::new();
    let running = tokio::spawn(subscription.run(shutdown.clone()));

    let repo = Repository::new(db.store.clone());
    let id = new_id();
    for i in 1..=10_i64 {
        let stored = repo
            .execute::<Account>(&id, AccountCommand::Deposit { amount: i })
            .await
            .unwrap();
        if i % 2 == 0 {
            progress
                .wait_until_projected(&stored, Duration::from_secs(10))
                .await
                .unwrap();
        } else {
            db.store
                .wait_until_projected(&projection, &stored, Duration::from_secs(10))
                .await
                .unwrap();
        }
        assert_eq!(
            projection.balance(&db, &id).await,
            Some((1..=i).sum::<i64>()),
            "after deposit {i}"
        );
        assert!(progress.position() >= stored[0].position);
    }
    let report = progress.report();
    assert_eq!(report.handled, 10, "{report:?}");

    // No events: nothing to wait for.
    let none: [EventEnvelope<AccountEvent>; 0] = [];
    db.store
        .wait_until_projected(&projection, &none, Duration::ZERO)
        .await
        .unwrap();

    shutdown.trigger();
    running.await.unwrap().unwrap();
}

/// Without a running projection the wait gives up after its timeout with an error that
/// names the projection (and its version) and the event; a parked stream fails at once.
#[tokio::test]
async fn a_wait_times_out_or_fails_at_once_for_a_parked_stream() {
    let db = common::store().await;
    let projection = Balances::new(&db, 2).await;
    let repo = Repository::new(db.store.clone());
    let id = new_id();
    let stored = repo
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 5 })
        .await
        .unwrap();

    let started = Instant::now();
    let err = db
        .store
        .wait_until_projected(&projection, &stored, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        err.to_string(),
        format!(
            "timed out after 200 ms: waiting for projection `ryw_balances@v2` to apply event 1 \
             of pg_test_account `{id}` (it has applied none of the stream's events)"
        )
    );

    // Version 2 applies it; version 1's checkpoints know nothing of it.
    let subscription = PgSubscription::new::<Account>(db.store.clone(), projection.clone());
    subscription.catch_up().await.unwrap();
    db.store
        .wait_until_projected(&projection, &stored, Duration::ZERO)
        .await
        .unwrap();
    let v1 = Balances::new(&db, 1).await;
    let err = db
        .store
        .wait_until_projected(&v1, &stored, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");

    // A parked stream will not move until an operator acts: no point waiting.
    let second = repo
        .execute::<Account>(&id, AccountCommand::Deposit { amount: 6 })
        .await
        .unwrap();
    db.store
        .park_stream("ryw_balances@v2", "pg_test_account", &id, 2, "boom")
        .await
        .unwrap();
    let started = Instant::now();
    let err = db
        .store
        .wait_until_projected_by_key("ryw_balances@v2", &second, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, Error::Handler { .. }), "{err:?}");
    let text = format!("{err} {:?}", err);
    assert!(text.contains("parked"), "{text}");
}

/// `wait_until_caught_up` waits for every event of the given types stored when it
/// began, without the events at hand, and says how many that is; events of other types
/// do not count.
#[tokio::test]
async fn a_wait_for_everything_stored_counts_the_events() {
    let db = common::store().await;
    let projection = Balances::new(&db, 1).await;
    let repo = Repository::new(db.store.clone());
    for (i, id) in [new_id(), new_id()].iter().enumerate() {
        for amount in 0..=i as i64 {
            repo.execute::<Account>(id, AccountCommand::Deposit { amount: amount + 1 })
                .await
                .unwrap();
        }
    }
    let types = [<Account as thalo::AggregateType>::TYPE];
    let err = db
        .store
        .wait_until_caught_up(&projection, &types, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");

    PgSubscription::new::<Account>(db.store.clone(), projection.clone())
        .catch_up()
        .await
        .unwrap();
    let events = db
        .store
        .wait_until_caught_up(&projection, &types, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(events, 3);
    let none = db
        .store
        .wait_until_caught_up_by_key("ryw_balances", &["no_such_type"], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(none, 0);
}
