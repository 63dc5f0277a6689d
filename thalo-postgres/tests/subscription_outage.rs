//! A database outage met by a projection's own queries does not stop a
//! `PgSubscription`: it is retried; any other projection error stops it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{new_id, Account, AccountCommand, AccountEvent};
use sqlx::PgConnection;
use thalo::{Error, EventEnvelope, Repository, Shutdown};
use thalo_postgres::{database_outage, PgProjection, PgSubscription};

/// Fails its first `failures` calls with `failure()`, then counts deposits.
#[derive(Debug)]
struct Flaky {
    calls: AtomicUsize,
    failures: usize,
    failure: fn() -> Error,
    applied: AtomicUsize,
}

impl PgProjection<AccountEvent> for Arc<Flaky> {
    fn name(&self) -> &str {
        "flaky"
    }

    async fn handle(
        &self,
        _tx: &mut PgConnection,
        _envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err((self.failure)());
        }
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn flaky(failures: usize, failure: fn() -> Error) -> Arc<Flaky> {
    Arc::new(Flaky {
        calls: AtomicUsize::new(0),
        failures,
        failure,
        applied: AtomicUsize::new(0),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_inside_the_projection_is_retried() {
    let lost = || Error::handler("flaky", Error::store("updating", sqlx::Error::PoolTimedOut));
    assert_eq!(database_outage(&lost()), Some(true));

    let db = common::store().await;
    let projection = flaky(2, lost);
    let subscription = PgSubscription::new::<Account>(db.store.clone(), projection.clone());
    let progress = subscription.progress();
    let shutdown = Shutdown::new();
    let running = tokio::spawn(subscription.run(shutdown.clone()));

    let stored = Repository::new(db.store.clone())
        .execute::<Account>(&new_id(), AccountCommand::Deposit { amount: 3 })
        .await
        .unwrap();
    // Two failed attempts, backing off from 100 ms, then applied.
    progress
        .wait_until_projected(&stored, Duration::from_secs(10))
        .await
        .expect("the subscription retried the outage");
    assert_eq!(projection.applied.load(Ordering::SeqCst), 1);
    assert_eq!(projection.calls.load(Ordering::SeqCst), 3);
    assert!(!running.is_finished());
    shutdown.trigger();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn another_projection_error_stops_the_subscription() {
    let broken = || Error::handler("flaky", Error::store("updating", sqlx::Error::RowNotFound));
    assert_eq!(database_outage(&broken()), Some(false));

    let db = common::store().await;
    let projection = flaky(1, broken);
    Repository::new(db.store.clone())
        .execute::<Account>(&new_id(), AccountCommand::Deposit { amount: 3 })
        .await
        .unwrap();
    let subscription = PgSubscription::new::<Account>(db.store.clone(), projection.clone());
    let err = tokio::time::timeout(Duration::from_secs(10), subscription.run(Shutdown::new()))
        .await
        .expect("stops at once")
        .unwrap_err();
    assert!(matches!(err, Error::Handler { .. }), "{err:?}");
    assert_eq!(projection.applied.load(Ordering::SeqCst), 0);
}
