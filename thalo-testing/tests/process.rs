//! Process managers: given/when/then with `ProcessManagerTest`, and end to end in memory
//! with `ProcessRunner` over an `InMemoryEventStore`.

mod timers;
mod transfer;

use std::time::Duration;

use thalo::{Error, EventStore as _, InMemoryEventStore, ProcessRunner, Repository};
use thalo_testing::ProcessManagerTest;
use transfer::*;

fn transfers() -> Transfers {
    Transfers {
        timeout: Duration::from_secs(30),
    }
}

fn started(approval: bool) -> StartedEvent {
    StartedEvent {
        from: "alice".into(),
        to: "bob".into(),
        cents: 30,
        approval,
    }
}

fn withdrawn() -> WithdrawnEvent {
    WithdrawnEvent {
        transfer: "t-1".into(),
        cents: 30,
    }
}

#[test]
fn a_started_transfer_withdraws_and_sets_its_timeout() {
    ProcessManagerTest::new(transfers())
        .when::<Transfer>("t-1".into(), started(false))
        .then_commands(&[r#"withdraw: wallet/alice Withdraw { transfer: "t-1", cents: 30 }"#])
        .then_timer_set("timeout")
        .then_timer_set_after("timeout", Duration::from_secs(30))
        .then_running()
        .then_state(|s| {
            assert_eq!(
                (s.from.as_str(), s.to.as_str(), s.cents),
                ("alice", "bob", 30)
            );
        });
}

#[test]
fn a_withdrawal_deposits_then_the_deposit_completes() {
    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .when::<Wallet>("alice".into(), withdrawn())
        .then_commands(&[r#"deposit: wallet/bob Deposit { transfer: "t-1", cents: 30 }"#])
        .then_timer_set("timeout");

    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .given::<Wallet>("alice".into(), withdrawn())
        .when::<Wallet>(
            "bob".into(),
            DepositedEvent {
                transfer: "t-1".into(),
                cents: 30,
            },
        )
        .then_commands(&[r#"complete: transfer/t-1 Complete"#])
        .then_timer_not_set("timeout");

    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .when::<Transfer>("t-1".into(), CompletedEvent {})
        .then_commands(&[])
        .then_completed()
        .then_timer_not_set("timeout");
}

#[test]
fn a_rejected_deposit_is_refunded_at_once() {
    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .rejecting("deposit", Error::invariant_code("WALLET_NOT_OPEN"))
        .when::<Wallet>("alice".into(), withdrawn())
        .then_commands(&[
            r#"deposit: wallet/bob Deposit { transfer: "t-1", cents: 30 }"#,
            r#"refund: wallet/alice Refund { transfer: "t-1", cents: 30 }"#,
        ])
        .then_state(|s| {
            assert!(s.refunding && !s.depositing);
            assert_eq!(s.failure.as_deref(), Some("WALLET_NOT_OPEN"));
        });

    // The refund then fails the transfer, with the reason.
    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .rejecting("deposit", Error::invariant_code("WALLET_NOT_OPEN"))
        .given::<Wallet>("alice".into(), withdrawn())
        .when::<Wallet>(
            "alice".into(),
            RefundedEvent {
                transfer: "t-1".into(),
                cents: 30,
            },
        )
        .then_commands(&[r#"fail: transfer/t-1 Fail { reason: "WALLET_NOT_OPEN" }"#])
        .then_timer_not_set("timeout");
}

#[test]
fn a_rejected_withdrawal_fails_the_transfer() {
    ProcessManagerTest::new(transfers())
        .rejecting("withdraw", Error::invariant_code("INSUFFICIENT_FUNDS"))
        .when::<Transfer>("t-1".into(), started(false))
        .then_commands(&[
            r#"withdraw: wallet/alice Withdraw { transfer: "t-1", cents: 30 }"#,
            r#"fail: transfer/t-1 Fail { reason: "INSUFFICIENT_FUNDS" }"#,
        ])
        .then_timer_not_set("timeout");
}

#[test]
fn a_timeout_before_the_withdrawal_is_seen_refunds_it_when_it_is() {
    // The withdrawal succeeded, but the timer fires before its event is handled: nothing
    // to refund yet, and failing now would lose the money.
    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .when_timer("timeout")
        .then_commands(&[])
        .then_state(|s| assert!(s.timed_out && !s.withdrawn));

    ProcessManagerTest::new(transfers())
        .with_state(TransferState {
            id: "t-1".into(),
            from: "alice".into(),
            to: "bob".into(),
            cents: 30,
            timed_out: true,
            ..TransferState::default()
        })
        .when::<Wallet>("alice".into(), withdrawn())
        .then_commands(&[r#"refund: wallet/alice Refund { transfer: "t-1", cents: 30 }"#])
        .then_state(|s| assert_eq!(s.failure.as_deref(), Some("timed out")));
}

#[test]
fn the_timeout_refunds_a_withdrawal_waiting_for_approval() {
    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(true))
        .given::<Wallet>("alice".into(), withdrawn())
        .when_timer("timeout")
        .then_commands(&[r#"refund: wallet/alice Refund { transfer: "t-1", cents: 30 }"#])
        .then_timer_not_set("timeout")
        .then_state(|s| assert_eq!(s.failure.as_deref(), Some("timed out")));

    // A late approval after the refund deposits nothing: neither while the refund is
    // on its way ...
    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(true))
        .given::<Wallet>("alice".into(), withdrawn())
        .given_timer("timeout")
        .when::<Transfer>("t-1".into(), ApprovedEvent {})
        .then_commands(&[])
        .then_running()
        .then_state(|s| assert!(s.approved && s.refunding && !s.depositing));
    // ... nor once it is refunded and the transfer is failing.
    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(true))
        .given::<Wallet>("alice".into(), withdrawn())
        .given_timer("timeout")
        .given::<Wallet>(
            "alice".into(),
            RefundedEvent {
                transfer: "t-1".into(),
                cents: 30,
            },
        )
        .when::<Transfer>("t-1".into(), ApprovedEvent {})
        .then_commands(&[])
        .then_timer_not_set("timeout")
        .then_state(|s| assert!(s.approved && !s.depositing));
}

#[test]
#[should_panic(expected = "when_timer(\"timeout\"): the timer is not pending")]
fn a_timer_that_was_never_set_cannot_fire() {
    let _ = ProcessManagerTest::new(transfers()).when_timer("timeout");
}

#[test]
#[should_panic(expected = "when_timer(\"timeout\"): the timer is not pending")]
fn a_cancelled_timer_cannot_fire() {
    // The deposit cancels the timeout; the instance keeps running until `Completed`.
    let _ = ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .given::<Wallet>("alice".into(), withdrawn())
        .given::<Wallet>(
            "bob".into(),
            DepositedEvent {
                transfer: "t-1".into(),
                cents: 30,
            },
        )
        .when_timer("timeout");
}

#[test]
#[should_panic(expected = "given_timer(\"timeout\"): the timer is not pending")]
fn a_timer_fires_only_once() {
    let _ = ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .given_timer("timeout")
        .given_timer("timeout");
}

#[test]
#[should_panic(expected = "when_timer(\"timeout\"): the instance has completed")]
fn a_completed_instance_fires_no_timer() {
    let _ = ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .given::<Transfer>("t-1".into(), CompletedEvent {})
        .when_timer("timeout");
}

#[test]
fn the_outcome_has_the_keys_the_runners_use() {
    let outcome = ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .rejecting("deposit", Error::invariant_code("WALLET_NOT_OPEN"))
        .when::<Wallet>("alice".into(), withdrawn())
        .then_command_keys_unique();
    let event = thalo::EventEnvelope {
        id: outcome.cause(),
        aggregate_type: "wallet".to_owned(),
        aggregate_id: "alice".to_owned(),
        sequence: 1,
        position: 2,
        timestamp: chrono::Utc::now(),
        metadata: thalo::Metadata::new(),
        event: (),
    };
    let keys = outcome.command_keys().unwrap();
    assert_eq!(
        keys,
        [
            (
                "deposit".to_owned(),
                thalo::CommandId::caused_by(&event, "deposit")
            ),
            (
                "refund".to_owned(),
                thalo::CommandId::caused_by(&event, "refund")
            ),
        ]
    );
}

#[test]
fn events_of_a_completed_instance_and_uncorrelated_events_are_ignored() {
    ProcessManagerTest::new(transfers())
        .given::<Transfer>("t-1".into(), started(false))
        .given::<Transfer>("t-1".into(), FailedEvent { reason: "x".into() })
        .when::<Wallet>("alice".into(), withdrawn())
        .then_commands(&[])
        .then_completed();

    ProcessManagerTest::new(transfers())
        .when::<Wallet>("alice".into(), OpenedEvent { cents: 5 })
        .then_commands(&[])
        .then_state(|s| assert_eq!(*s, TransferState::default()));
}

async fn open(repo: &Repository<InMemoryEventStore>, wallet: &str, cents: i64) {
    repo.execute::<Wallet>(&wallet.to_owned(), WalletCommand::Open { cents })
        .await
        .unwrap();
}

async fn cents(repo: &Repository<InMemoryEventStore>, wallet: &str) -> i64 {
    repo.load::<Wallet>(&wallet.to_owned())
        .await
        .unwrap()
        .aggregate
        .cents()
}

#[tokio::test]
async fn in_memory_transfers_complete_refund_and_time_out() {
    let store = InMemoryEventStore::new();
    let repo = Repository::new(store.clone());
    open(&repo, "alice", 100).await;
    open(&repo, "bob", 0).await;
    repo.execute::<Wallet>(&"carol".to_owned(), WalletCommand::Close {})
        .await
        .unwrap();
    let start = |id: &str, to: &str, approval: bool| {
        let repo = repo.clone();
        let (id, to) = (id.to_owned(), to.to_owned());
        async move {
            repo.execute::<Transfer>(
                &id,
                TransferCommand::Start {
                    from: "alice".into(),
                    to,
                    cents: 30,
                    approval,
                },
            )
            .await
            .unwrap();
        }
    };
    start("ok", "bob", false).await;
    start("closed", "carol", false).await;
    start("slow", "bob", true).await;

    let runner = ProcessRunner::new(
        repo.clone(),
        Transfers {
            timeout: Duration::from_millis(200),
        },
    )
    .with_poll_interval(Duration::from_millis(20));
    let stop = thalo::Shutdown::new();
    let running = tokio::spawn(runner.run(stop.clone()));

    // "ok" completes, "closed" is refunded at once; "slow" waits for an approval that
    // never comes, and its timeout refunds it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = |id: &'static str| {
            let repo = repo.clone();
            async move { repo.load::<Transfer>(&id.to_owned()).await.unwrap().version }
        };
        if events("ok").await == 2 && events("closed").await == 2 && events("slow").await == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "transfers did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the runner see the last events, then stop it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.trigger();
    let runner = running.await.unwrap().unwrap();

    assert_eq!(cents(&repo, "alice").await, 70, "only `ok` moved money");
    assert_eq!(cents(&repo, "bob").await, 30);
    for id in ["ok", "closed", "slow"] {
        assert!(runner.is_completed(id), "{id} completed");
        assert!(runner.timers(id).is_empty(), "{id} has no timer left");
    }
    assert_eq!(
        runner.state("closed").unwrap().failure.as_deref(),
        Some("WALLET_NOT_OPEN")
    );
    assert_eq!(
        runner.state("slow").unwrap().failure.as_deref(),
        Some("timed out")
    );
    let alice = repo
        .store()
        .read_stream::<Wallet>(&"alice".to_owned(), 0)
        .await
        .unwrap();
    let kinds: Vec<_> = alice
        .iter()
        .map(|e| thalo::Event::event_type(&e.event))
        .collect();
    assert_eq!(
        kinds,
        [
            "Opened",
            "Withdrawn",
            "Withdrawn",
            "Withdrawn",
            "Refunded",
            "Refunded"
        ]
    );
}

/// A runner of the `timers` fixture over a fresh in-memory store.
fn timer_runner() -> (
    Repository<InMemoryEventStore>,
    ProcessRunner<InMemoryEventStore, timers::Timers>,
) {
    let repo = Repository::new(InMemoryEventStore::new());
    let runner = ProcessRunner::new(repo.clone(), timers::Timers);
    (repo, runner)
}

#[tokio::test]
async fn a_timer_that_completes_its_instance_stops_the_other_due_timers() {
    let (repo, mut runner) = timer_runner();
    timers::schedule(&repo, "p", "a", 10, "complete").await;
    timers::schedule(&repo, "p", "b", 30, "").await;
    runner.catch_up().await.unwrap();
    assert_eq!(runner.timers("p"), ["a", "b"]);
    tokio::time::sleep(Duration::from_millis(80)).await;

    // Both are due; `a` fires first and completes the instance: `b` must not fire.
    assert_eq!(runner.fire_due_timers().await.unwrap(), 1);
    assert!(runner.is_completed("p"));
    assert!(runner.timers("p").is_empty());
    assert_eq!(runner.state("p").unwrap().fired, ["a"]);
    assert_eq!(runner.fire_due_timers().await.unwrap(), 0);
    runner.catch_up().await.unwrap(); // `Fired`, ignored: completed
    assert!(runner.is_completed("p"), "completion is final");
    assert_eq!(timers::fired(repo.store(), "p").await, ["a"]);
}

#[tokio::test]
async fn a_timer_cancelled_or_replaced_by_an_earlier_firing_of_the_batch_does_not_fire() {
    let (repo, mut runner) = timer_runner();
    timers::schedule(&repo, "p", "a", 10, "cancel:b").await;
    timers::schedule(&repo, "p", "b", 20, "").await;
    timers::schedule(&repo, "p", "c", 30, "set:d:500").await;
    timers::schedule(&repo, "p", "d", 40, "").await;
    timers::schedule(&repo, "p", "e", 50, "").await;
    runner.catch_up().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // All five are due: `a` cancels `b`, `c` moves `d` 500 ms later; `e` fires.
    assert_eq!(runner.fire_due_timers().await.unwrap(), 3);
    assert_eq!(runner.state("p").unwrap().fired, ["a", "c", "e"]);
    assert_eq!(runner.timers("p"), ["d"], "`d` waits for its new time");
    assert!(!runner.is_completed("p"));
    assert_eq!(runner.fire_due_timers().await.unwrap(), 0);

    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(runner.fire_due_timers().await.unwrap(), 1);
    assert_eq!(runner.fire_due_timers().await.unwrap(), 0);
    assert!(runner.timers("p").is_empty());
    assert_eq!(
        timers::fired(repo.store(), "p").await,
        ["a", "c", "e", "d"],
        "`b` never fired, `d` once"
    );
}

#[tokio::test]
async fn cancel_timer_alone_cancels_one_timer_and_the_other_still_fires() {
    let (repo, mut runner) = timer_runner();
    timers::schedule(&repo, "p", "a", 30, "").await;
    timers::schedule(&repo, "p", "b", 30, "").await;
    runner.catch_up().await.unwrap();
    timers::cancel(&repo, "p", "b").await;
    runner.catch_up().await.unwrap();
    assert_eq!(runner.timers("p"), ["a"]);
    assert!(!runner.is_completed("p"), "cancelling does not complete");

    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(runner.fire_due_timers().await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(runner.fire_due_timers().await.unwrap(), 0);
    assert!(runner.timers("p").is_empty());
    assert!(!runner.is_completed("p"));
    assert_eq!(runner.state("p").unwrap().fired, ["a"]);
    assert_eq!(timers::fired(repo.store(), "p").await, ["a"]);
}

#[tokio::test]
async fn setting_a_timer_again_replaces_it() {
    let (repo, mut runner) = timer_runner();
    timers::schedule(&repo, "p", "x", 10, "").await;
    timers::schedule(&repo, "p", "x", 600, "").await;
    runner.catch_up().await.unwrap();
    assert_eq!(runner.timers("p"), ["x"]);

    // The first time has passed: the replaced timer does not fire ...
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runner.fire_due_timers().await.unwrap(), 0);
    assert_eq!(runner.timers("p"), ["x"]);
    // ... its replacement does, once, at its own time.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(runner.fire_due_timers().await.unwrap(), 1);
    assert_eq!(runner.fire_due_timers().await.unwrap(), 0);
    assert!(runner.timers("p").is_empty());
    assert_eq!(timers::fired(repo.store(), "p").await, ["x"]);
}
