//! Process managers on Postgres: `PgProcessManager` executes each command exactly once
//! across crashes before its commit, fires durable timers once (after a restart, with two
//! runners at once), never fires a cancelled or replaced timer (also when an earlier
//! timer of the same batch cancelled it), records each firing once in
//! `process_timer_firings`, and drives many instances to the end.

mod common;
// The same fixture as thalo-testing's process-manager tests: one definition of the
// example process manager for both runners.
#[path = "../../thalo-testing/tests/transfer/mod.rs"]
mod transfer;
// The timer fixture of thalo-testing's in-memory runner tests, for the same checks.
#[path = "../../thalo-testing/tests/timers/mod.rs"]
mod timers;

use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use thalo::{CheckpointStore, Event, EventStore, Repository};
use thalo_postgres::{PgEventStore, PgProcessManager, TimerFiring};
use transfer::*;

fn runner(store: &PgEventStore, timeout: Duration) -> PgProcessManager<Transfers> {
    PgProcessManager::new(store.clone(), Transfers { timeout })
        .with_poll_interval(Duration::from_millis(50))
}

async fn open(repo: &Repository<PgEventStore>, wallet: &str, cents: i64) {
    repo.execute::<Wallet>(&wallet.to_owned(), WalletCommand::Open { cents })
        .await
        .unwrap();
}

async fn start(repo: &Repository<PgEventStore>, id: &str, from: &str, to: &str, approval: bool) {
    repo.execute::<Transfer>(
        &id.to_owned(),
        TransferCommand::Start {
            from: from.to_owned(),
            to: to.to_owned(),
            cents: 30,
            approval,
        },
    )
    .await
    .unwrap();
}

async fn wallet_events(store: &PgEventStore, wallet: &str) -> Vec<&'static str> {
    store
        .read_stream::<Wallet>(&wallet.to_owned(), 0)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event.event_type())
        .collect()
}

async fn transfer_events(store: &PgEventStore, id: &str) -> Vec<&'static str> {
    store
        .read_stream::<Transfer>(&id.to_owned(), 0)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event.event_type())
        .collect()
}

/// Catches up until `instance` saw its withdrawal (appended by its own command; an
/// event can be held back for a while by other tests' transactions).
async fn until_withdrawn(runner: &PgProcessManager<Transfers>, instance: &str) {
    for _ in 0..50 {
        runner.catch_up().await.unwrap();
        if runner
            .instance(instance)
            .await
            .unwrap()
            .is_some_and(|i| i.state.withdrawn)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{instance} did not see its withdrawal");
}

/// Catches up until `instance` completed (its last events are appended by its own
/// commands, so several catch-ups are needed).
async fn until_completed(runner: &PgProcessManager<Transfers>, instance: &str) {
    for _ in 0..20 {
        runner.catch_up().await.unwrap();
        if runner
            .instance(instance)
            .await
            .unwrap()
            .is_some_and(|i| i.completed)
        {
            return;
        }
    }
    panic!("{instance} did not complete");
}

#[tokio::test]
async fn commands_are_executed_once_across_crashes_before_the_commit() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    open(&repo, "alice", 100).await;
    open(&repo, "bob", 0).await;
    start(&repo, "t-1", "alice", "bob", false).await;

    // Each of the first three transactions fails after its commands ran, as if the
    // process died before the commit: every event is reacted to again, from the same
    // state, and its commands are replayed by key.
    let failures = Arc::new(AtomicU32::new(3));
    let crashing = runner(&db.store, Duration::from_secs(60)).fail_before_commit(failures.clone());
    let mut crashed = 0;
    for _ in 0..3 {
        match crashing.catch_up().await {
            Err(err @ thalo::Error::Store { .. }) => {
                assert!(err.to_string().contains("committing"), "{err}");
                crashed += 1;
            }
            other => panic!("expected the injected failure, got {other:?}"),
        }
    }
    assert_eq!(crashed, 3);
    assert_eq!(
        db.store.load_checkpoint("transfers").await.unwrap(),
        None,
        "nothing committed"
    );
    // At most the marker of the inputs in flight (replayed by the next runner), next to
    // the default state.
    if let Some(instance) = crashing.instance("t-1").await.unwrap() {
        assert_eq!(instance.state, TransferState::default());
        assert!(!instance.completed);
    }

    // A fresh runner finishes the job.
    let fresh = runner(&db.store, Duration::from_secs(60));
    until_completed(&fresh, "t-1").await;

    assert_eq!(
        wallet_events(&db.store, "alice").await,
        ["Opened", "Withdrawn"]
    );
    assert_eq!(
        wallet_events(&db.store, "bob").await,
        ["Opened", "Deposited"]
    );
    assert_eq!(
        transfer_events(&db.store, "t-1").await,
        ["Started", "Completed"]
    );
    let instance = fresh.instance("t-1").await.unwrap().unwrap();
    assert!(instance.completed);
    assert!(instance.state.withdrawn && instance.state.depositing);
    assert!(fresh.timers("t-1").await.unwrap().is_empty());
    let last = db
        .store
        .read_all(0, 1000)
        .await
        .unwrap()
        .last()
        .map(|e| e.position);
    assert_eq!(db.store.load_checkpoint("transfers").await.unwrap(), last);
}

#[tokio::test]
async fn a_timer_fires_once_after_a_restart_even_with_two_runners() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    open(&repo, "alice", 100).await;
    open(&repo, "bob", 0).await;
    // Needs an approval that never comes: the timeout refunds it.
    start(&repo, "slow", "alice", "bob", true).await;

    let timeout = Duration::from_millis(200);
    {
        let first = runner(&db.store, timeout);
        until_withdrawn(&first, "slow").await;
        assert_eq!(first.timers("slow").await.unwrap(), ["timeout"]);
        assert_eq!(first.fire_due_timers().await.unwrap(), 0, "not due yet");
        // Stopped before the timer is due.
    }
    assert_eq!(
        wallet_events(&db.store, "alice").await,
        ["Opened", "Withdrawn"]
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    // Two new runners at once (a crash of the first in the middle of firing is
    // replayed too): it fires once.
    let (a, b) = (runner(&db.store, timeout), runner(&db.store, timeout));
    let crashing = runner(&db.store, timeout).fail_before_commit(Arc::new(AtomicU32::new(1)));
    assert!(crashing.fire_due_timers().await.is_err());
    let (fired_a, fired_b) = tokio::join!(a.fire_due_timers(), b.fire_due_timers());
    assert_eq!(fired_a.unwrap() + fired_b.unwrap(), 1);
    assert_eq!(a.fire_due_timers().await.unwrap(), 0);
    until_completed(&a, "slow").await;

    assert_eq!(
        wallet_events(&db.store, "alice").await,
        ["Opened", "Withdrawn", "Refunded"],
        "refunded once, although the first firing crashed before its commit"
    );
    assert_eq!(wallet_events(&db.store, "bob").await, ["Opened"]);
    assert_eq!(
        transfer_events(&db.store, "slow").await,
        ["Started", "Failed"]
    );
    let instance = a.instance("slow").await.unwrap().unwrap();
    assert_eq!(instance.state.failure.as_deref(), Some("timed out"));
    assert!(a.timers("slow").await.unwrap().is_empty());
    let firings = a.timer_firings(Some("slow")).await.unwrap();
    assert_eq!(names(&firings), ["timeout"], "one firing recorded");
    assert!(firings[0].due_at <= firings[0].fired_at);
}

#[tokio::test]
async fn a_cancelled_timer_never_fires() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    open(&repo, "alice", 100).await;
    open(&repo, "bob", 0).await;
    start(&repo, "t-1", "alice", "bob", true).await;
    let timeout = Duration::from_millis(200);
    let pm = runner(&db.store, timeout);
    until_withdrawn(&pm, "t-1").await;
    assert_eq!(pm.timers("t-1").await.unwrap(), ["timeout"]);
    repo.execute::<Transfer>(&"t-1".to_owned(), TransferCommand::Approve {})
        .await
        .unwrap();
    until_completed(&pm, "t-1").await;
    assert!(pm.timers("t-1").await.unwrap().is_empty());

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pm.fire_due_timers().await.unwrap(), 0);
    assert_eq!(
        wallet_events(&db.store, "alice").await,
        ["Opened", "Withdrawn"]
    );
    assert_eq!(
        wallet_events(&db.store, "bob").await,
        ["Opened", "Deposited"]
    );
    assert_eq!(
        transfer_events(&db.store, "t-1").await,
        ["Started", "Approved", "Completed"]
    );
}

#[tokio::test]
async fn many_instances_complete_with_two_runners() {
    let db = common::store_with(20, |b| b).await;
    let repo = Repository::new(db.store.clone());
    const N: usize = 50;
    for i in 0..N {
        open(&repo, &format!("from-{i}"), 100).await;
        // Every fifth destination is closed: those transfers are refunded.
        if i % 5 == 0 {
            repo.execute::<Wallet>(&format!("to-{i}"), WalletCommand::Close {})
                .await
                .unwrap();
        } else {
            open(&repo, &format!("to-{i}"), 0).await;
        }
    }
    let stop = thalo::Shutdown::new();
    let runners: Vec<_> = (0..2)
        .map(|_| tokio::spawn(runner(&db.store, Duration::from_secs(60)).run(stop.clone())))
        .collect();
    let starts: Vec<_> = (0..N)
        .map(|i| {
            let repo = repo.clone();
            tokio::spawn(async move {
                start(
                    &repo,
                    &format!("t-{i}"),
                    &format!("from-{i}"),
                    &format!("to-{i}"),
                    false,
                )
                .await;
            })
        })
        .collect();
    for s in starts {
        s.await.unwrap();
    }

    let probe = runner(&db.store, Duration::from_secs(60));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for i in 0..N {
        let id = format!("t-{i}");
        loop {
            if probe
                .instance(&id)
                .await
                .unwrap()
                .is_some_and(|i| i.completed)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} did not complete"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.trigger();
    for r in runners {
        r.await.unwrap().unwrap();
    }

    for i in 0..N {
        let expected: &[&str] = if i % 5 == 0 {
            &["Opened", "Withdrawn", "Refunded"]
        } else {
            &["Opened", "Withdrawn"]
        };
        assert_eq!(
            wallet_events(&db.store, &format!("from-{i}")).await,
            expected,
            "from-{i}"
        );
        let outcome = if i % 5 == 0 { "Failed" } else { "Completed" };
        assert_eq!(
            transfer_events(&db.store, &format!("t-{i}")).await,
            ["Started", outcome],
            "t-{i}"
        );
        assert!(probe.timers(&format!("t-{i}")).await.unwrap().is_empty());
    }
}

/// The balance of `wallet`, from its events.
async fn balance(store: &PgEventStore, wallet: &str) -> i64 {
    store
        .read_stream::<Wallet>(&wallet.to_owned(), 0)
        .await
        .unwrap()
        .iter()
        .map(|e| match &e.event {
            WalletEvent::Opened(e) => e.cents,
            WalletEvent::Withdrawn(e) => -e.cents,
            WalletEvent::Deposited(e) => e.cents,
            WalletEvent::Refunded(e) => e.cents,
            WalletEvent::Closed(_) => 0,
        })
        .sum()
}

#[tokio::test]
async fn a_timer_interrupted_after_its_commands_is_replayed_before_the_next_event() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    open(&repo, "alice", 100).await;
    open(&repo, "bob", 0).await;
    start(&repo, "t-1", "alice", "bob", true).await;

    let timeout = Duration::from_millis(200);
    let first = runner(&db.store, timeout);
    until_withdrawn(&first, "t-1").await; // waiting for the approval
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The timeout fires and refunds alice, then the runner dies before its commit: the
    // saved state still says "withdrawn, waiting for the approval".
    let crashing = runner(&db.store, timeout).fail_before_commit(Arc::new(AtomicU32::new(1)));
    let err = crashing.fire_due_timers().await.unwrap_err();
    assert!(format!("{err:?}").contains("injected failure"), "{err:?}");
    assert_eq!(
        wallet_events(&db.store, "alice").await,
        ["Opened", "Withdrawn", "Refunded"]
    );
    // The approval arrives before a restarted runner fires the timer again; a runner
    // catches up on events before it fires timers. Reacting to `Refunded` and `Approved`
    // from the saved state would deposit too: the interrupted firing is replayed first.
    repo.execute::<Transfer>(&"t-1".to_owned(), TransferCommand::Approve {})
        .await
        .unwrap();
    let restarted = runner(&db.store, timeout);
    until_completed(&restarted, "t-1").await;
    assert_eq!(restarted.fire_due_timers().await.unwrap(), 0);

    assert_eq!(
        wallet_events(&db.store, "alice").await,
        ["Opened", "Withdrawn", "Refunded"],
        "refunded once"
    );
    assert_eq!(
        wallet_events(&db.store, "bob").await,
        ["Opened"],
        "not deposited after the refund"
    );
    assert_eq!(
        balance(&db.store, "alice").await + balance(&db.store, "bob").await,
        100,
        "money conserved"
    );
    assert_eq!(
        transfer_events(&db.store, "t-1").await,
        ["Started", "Approved", "Failed"]
    );
    let instance = restarted.instance("t-1").await.unwrap().unwrap();
    assert_eq!(instance.state.failure.as_deref(), Some("timed out"));
    assert!(!instance.state.depositing);
    assert!(restarted.timers("t-1").await.unwrap().is_empty());
    // Replayed by the event batch, and recorded there, once, with the row's due time.
    let firings = restarted.timer_firings(None).await.unwrap();
    assert_eq!(names(&firings), ["timeout"]);
    assert!(firings[0].due_at <= firings[0].fired_at);
}

#[tokio::test]
async fn an_event_interrupted_after_its_commands_is_replayed_before_a_timer() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    open(&repo, "alice", 100).await;
    open(&repo, "bob", 0).await;
    start(&repo, "t-1", "alice", "bob", false).await;

    let timeout = Duration::from_millis(200);
    let first = runner(&db.store, timeout);
    // Started: withdraws, sets the timeout; the withdrawal is not handled yet.
    for _ in 0..50 {
        first.catch_up().await.unwrap();
        if first.instance("t-1").await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let instance = first.instance("t-1").await.unwrap().unwrap();
    assert!(!instance.state.withdrawn);
    // The withdrawal's batch deposits to bob, then the runner dies before its commit.
    let crashing = runner(&db.store, timeout).fail_before_commit(Arc::new(AtomicU32::new(1)));
    let mut crashed = false;
    for _ in 0..20 {
        if let Err(err) = crashing.catch_up().await {
            assert!(format!("{err:?}").contains("injected failure"), "{err:?}");
            crashed = true;
            break;
        }
    }
    assert!(crashed);
    assert_eq!(
        wallet_events(&db.store, "bob").await,
        ["Opened", "Deposited"]
    );
    // The timeout is due before a runner read the withdrawal again: firing it from the
    // saved state ("not withdrawn yet") would fail a transfer whose money moved. It waits
    // until the interrupted batch is replayed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = runner(&db.store, timeout);
    assert_eq!(restarted.fire_due_timers().await.unwrap(), 0);
    assert_eq!(restarted.timers("t-1").await.unwrap(), ["timeout"]);
    until_completed(&restarted, "t-1").await;
    assert_eq!(restarted.fire_due_timers().await.unwrap(), 0);

    assert_eq!(
        wallet_events(&db.store, "alice").await,
        ["Opened", "Withdrawn"]
    );
    assert_eq!(
        wallet_events(&db.store, "bob").await,
        ["Opened", "Deposited"],
        "deposited once"
    );
    assert_eq!(
        balance(&db.store, "alice").await + balance(&db.store, "bob").await,
        100,
        "money conserved"
    );
    assert_eq!(
        transfer_events(&db.store, "t-1").await,
        ["Started", "Completed"]
    );
    assert!(restarted.timers("t-1").await.unwrap().is_empty());
    assert!(restarted.timer_firings(None).await.unwrap().is_empty());
}

/// The names of `firings`, in order.
fn names(firings: &[TimerFiring]) -> Vec<&str> {
    firings.iter().map(|f| f.name.as_str()).collect()
}

fn timer_runner(store: &PgEventStore) -> PgProcessManager<timers::Timers> {
    PgProcessManager::new(store.clone(), timers::Timers)
        .with_poll_interval(Duration::from_millis(50))
}

/// Catches up until `plan`'s pending timers are `expected` (an event can be held back
/// for a while by other tests' transactions).
async fn until_timers(pm: &PgProcessManager<timers::Timers>, plan: &str, expected: &[&str]) {
    for _ in 0..100 {
        pm.catch_up().await.unwrap();
        if pm.timers(plan).await.unwrap() == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{plan}'s timers are {:?}, not {expected:?}",
        pm.timers(plan).await.unwrap()
    );
}

/// How many rows of `process_timer_firings` share an id with another: the query a crash
/// test runs.
async fn duplicate_firings(db: &common::TestDb) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT id FROM {} GROUP BY id HAVING count(*) > 1) d",
        db.table("process_timer_firings")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_timer_that_completes_its_instance_stops_the_other_due_timers() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    timers::schedule(&repo, "p", "a", 10, "complete").await;
    timers::schedule(&repo, "p", "b", 30, "").await;
    let pm = timer_runner(&db.store);
    until_timers(&pm, "p", &["a", "b"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Both are due; `a` fires first and completes the instance: `b` must not fire.
    assert_eq!(pm.fire_due_timers().await.unwrap(), 1);
    let instance = pm.instance("p").await.unwrap().unwrap();
    assert!(instance.completed);
    assert_eq!(instance.state.fired, ["a"]);
    assert!(pm.timers("p").await.unwrap().is_empty());
    assert_eq!(pm.fire_due_timers().await.unwrap(), 0);
    pm.catch_up().await.unwrap(); // `Fired`, ignored: completed
    assert!(pm.instance("p").await.unwrap().unwrap().completed);
    assert_eq!(timers::fired(&db.store, "p").await, ["a"]);
    assert_eq!(names(&pm.timer_firings(Some("p")).await.unwrap()), ["a"]);
}

#[tokio::test]
async fn a_timer_cancelled_or_replaced_by_an_earlier_firing_of_the_batch_does_not_fire() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    timers::schedule(&repo, "p", "a", 10, "cancel:b").await;
    timers::schedule(&repo, "p", "b", 20, "").await;
    timers::schedule(&repo, "p", "c", 30, "set:d:1000").await;
    timers::schedule(&repo, "p", "d", 40, "").await;
    timers::schedule(&repo, "p", "e", 50, "").await;
    let pm = timer_runner(&db.store);
    until_timers(&pm, "p", &["a", "b", "c", "d", "e"]).await;
    tokio::time::sleep(Duration::from_millis(150)).await;

    // All five are due, in one batch: `a` cancels `b`, `c` moves `d` a second later;
    // `e` fires.
    assert_eq!(pm.fire_due_timers().await.unwrap(), 3);
    let instance = pm.instance("p").await.unwrap().unwrap();
    assert_eq!(instance.state.fired, ["a", "c", "e"]);
    assert!(!instance.completed);
    assert_eq!(
        pm.timers("p").await.unwrap(),
        ["d"],
        "`d` waits for its new time"
    );
    assert_eq!(pm.fire_due_timers().await.unwrap(), 0);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(pm.fire_due_timers().await.unwrap(), 1);
    assert_eq!(pm.fire_due_timers().await.unwrap(), 0);
    assert!(pm.timers("p").await.unwrap().is_empty());
    assert_eq!(
        timers::fired(&db.store, "p").await,
        ["a", "c", "e", "d"],
        "`b` never fired, `d` once"
    );
    let firings = pm.timer_firings(Some("p")).await.unwrap();
    assert_eq!(names(&firings), ["a", "c", "e", "d"]);
    assert_eq!(duplicate_firings(&db).await, 0);
}

#[tokio::test]
async fn cancel_timer_alone_cancels_one_timer_and_the_other_still_fires() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    timers::schedule(&repo, "p", "a", 50, "").await;
    timers::schedule(&repo, "p", "b", 50, "").await;
    let pm = timer_runner(&db.store);
    until_timers(&pm, "p", &["a", "b"]).await;
    timers::cancel(&repo, "p", "b").await;
    until_timers(&pm, "p", &["a"]).await;
    assert!(
        !pm.instance("p").await.unwrap().unwrap().completed,
        "cancelling does not complete"
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pm.fire_due_timers().await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pm.fire_due_timers().await.unwrap(), 0);
    assert!(pm.timers("p").await.unwrap().is_empty());
    let instance = pm.instance("p").await.unwrap().unwrap();
    assert!(!instance.completed);
    assert_eq!(instance.state.fired, ["a"]);
    assert_eq!(timers::fired(&db.store, "p").await, ["a"]);
    assert_eq!(names(&pm.timer_firings(Some("p")).await.unwrap()), ["a"]);
}

#[tokio::test]
async fn setting_a_timer_again_replaces_it() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    timers::schedule(&repo, "p", "x", 10, "").await;
    timers::schedule(&repo, "p", "x", 1000, "").await;
    let pm = timer_runner(&db.store);
    // Both events handled: the second (the plan's last) set `x` again.
    for _ in 0..100 {
        pm.catch_up().await.unwrap();
        if pm.instance("p").await.unwrap().is_some()
            && db.store.load_checkpoint("timers").await.unwrap()
                == db
                    .store
                    .read_all(0, 100)
                    .await
                    .unwrap()
                    .last()
                    .map(|e| e.position)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pm.timers("p").await.unwrap(), ["x"]);

    // The first time has passed: the replaced timer does not fire ...
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(pm.fire_due_timers().await.unwrap(), 0);
    assert_eq!(pm.timers("p").await.unwrap(), ["x"]);
    // ... its replacement does, once, at its own time.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(pm.fire_due_timers().await.unwrap(), 1);
    assert_eq!(pm.fire_due_timers().await.unwrap(), 0);
    assert!(pm.timers("p").await.unwrap().is_empty());
    assert_eq!(timers::fired(&db.store, "p").await, ["x"]);
    let firings = pm.timer_firings(None).await.unwrap();
    assert_eq!(names(&firings), ["x"]);
    assert!(
        firings[0].fired_at - firings[0].due_at < chrono::Duration::milliseconds(900),
        "fired at the replacement's time, not the first one's: {firings:?}"
    );
}

#[tokio::test]
async fn a_second_firing_of_a_timer_rolls_back_and_firings_are_pruned() {
    let db = common::store().await;
    let repo = Repository::new(db.store.clone());
    timers::schedule(&repo, "p", "a", 10, "").await;
    timers::schedule(&repo, "q", "b", 10, "").await;
    let pm = timer_runner(&db.store);
    until_timers(&pm, "p", &["a"]).await;
    until_timers(&pm, "q", &["b"]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    // A firing of `a` already recorded (as a runner that fired it without the lock
    // would have): firing it again violates the key, and the whole batch rolls back.
    let a: uuid::Uuid = sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE instance = 'p'",
        db.table("process_timers")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {} (id, process_manager, instance, name, due_at) VALUES ($1, 'timers', 'p', 'a', now())",
        db.table("process_timer_firings")
    ))
    .bind(a)
    .execute(&db.pool)
    .await
    .unwrap();
    let err = pm.fire_due_timers().await.unwrap_err();
    assert!(matches!(err, thalo::Error::Store { .. }), "{err:?}");
    assert_eq!(pm.timers("p").await.unwrap(), ["a"], "still pending");
    assert_eq!(pm.timers("q").await.unwrap(), ["b"], "rolled back with it");
    assert!(pm
        .instance("p")
        .await
        .unwrap()
        .unwrap()
        .state
        .fired
        .is_empty());

    sqlx::query(&format!(
        "DELETE FROM {} WHERE id = $1",
        db.table("process_timer_firings")
    ))
    .bind(a)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(pm.fire_due_timers().await.unwrap(), 2);
    assert_eq!(pm.fire_due_timers().await.unwrap(), 0);
    // The fixture's command is keyed by the timer: the rolled-back firing's is replayed.
    assert_eq!(timers::fired(&db.store, "p").await, ["a"]);
    let all = pm.timer_firings(None).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all.iter().find(|f| f.instance == "p").unwrap().id, a);
    assert_eq!(names(&pm.timer_firings(Some("q")).await.unwrap()), ["b"]);
    assert_eq!(duplicate_firings(&db).await, 0);

    // Pruning: nothing is an hour old yet; then `p`'s firing is.
    assert_eq!(
        pm.prune_timer_firings(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    sqlx::query(&format!(
        "UPDATE {} SET fired_at = now() - interval '2 hours' WHERE instance = 'p'",
        db.table("process_timer_firings")
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        pm.prune_timer_firings(Duration::from_secs(3600))
            .await
            .unwrap(),
        1
    );
    assert_eq!(names(&pm.timer_firings(None).await.unwrap()), ["b"]);
    // Another process manager's firings are not this one's to prune.
    let other = PgProcessManager::new(
        db.store.clone(),
        Transfers {
            timeout: Duration::from_secs(60),
        },
    );
    assert_eq!(other.prune_timer_firings(Duration::ZERO).await.unwrap(), 0);
    assert!(other.timer_firings(None).await.unwrap().is_empty());
    assert_eq!(pm.prune_timer_firings(Duration::ZERO).await.unwrap(), 1);
    assert!(pm.timer_firings(None).await.unwrap().is_empty());
}
