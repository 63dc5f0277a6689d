//! Transfers over HTTP on the real stack: the transfer process manager moves the money
//! (or compensates), `GET /transfers/{id}` follows it, `GET /owners/{owner}` adds up an
//! owner's accounts, and an `Idempotency-Key` makes a retried transfer request safe.

// Amounts in cents are written as `dollars_cents` (`100_00` is $100.00).
#![allow(clippy::inconsistent_digit_grouping)]

mod common;

use common::env_or;
use std::time::{Duration, Instant};

use bank::http::{ErrorBody, TransferView};
use bank::owners::OwnerBalance;
use bank::service::{start, ServiceConfig};
use bank::transfer::TransferStatus;
use bank::MoneyEvent;
use serde_json::json;
use thalo::{EventSet as _, Shutdown};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfers_complete_compensate_and_replay() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = ServiceConfig {
        database_url: env_or(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/thalo_test",
        ),
        kafka_brokers: env_or("KAFKA_BROKERS", "127.0.0.1:9092"),
        listen: "127.0.0.1:0".parse().expect("address"),
        schema: format!("bank_{id}"),
        topic_prefix: format!("test-{id}-"),
        group_prefix: format!("bank-{id}."),
        instance_id: format!("bank-test-{id}"),
        transfer_timeout: Duration::from_secs(5),
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let running = start(config, shutdown.clone()).await.expect(
        "the service starts (Postgres at DATABASE_URL and a broker at KAFKA_BROKERS are required)",
    );
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    for (account, owner, initial) in [
        ("ADA-1", "Ada", 100_00),
        ("ADA-2", "Ada", 50_00),
        ("BOB-1", "Bob", 0),
        ("BOB-2", "Bob", 0),
    ] {
        let res = http
            .post(format!("{base}/accounts"))
            .json(&json!({"account_number": account, "owner": owner, "initial_deposit": initial}))
            .send()
            .await
            .expect("open");
        assert_eq!(res.status(), 201, "{account}");
    }
    let res = http
        .post(format!("{base}/accounts/BOB-2/close"))
        .send()
        .await
        .expect("close");
    assert_eq!(res.status(), 200);

    let request = |key: &str, from: &str, to: &str, amount: i64| {
        http.post(format!("{base}/transfers"))
            .header("Idempotency-Key", key)
            .json(&json!({"from": from, "to": to, "amount": amount}))
            .send()
    };
    let replayed = |res: &reqwest::Response| {
        res.headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    };

    let res = request("tr-ok", "ADA-1", "BOB-1", 30_00)
        .await
        .expect("transfer");
    assert_eq!(res.status(), 202);
    assert!(!replayed(&res));
    let ok: TransferView = res.json().await.expect("transfer");
    assert_eq!(ok.status, TransferStatus::Requested);
    assert_eq!(
        (ok.from.as_str(), ok.to.as_str(), ok.amount),
        ("ADA-1", "BOB-1", 30_00)
    );
    // The retry finds the same transfer and moves nothing more.
    let res = request("tr-ok", "ADA-1", "BOB-1", 30_00)
        .await
        .expect("retry");
    assert_eq!(res.status(), 202);
    assert!(replayed(&res));
    let retry: TransferView = res.json().await.expect("transfer");
    assert_eq!(retry.id, ok.id);
    // Another transfer under a used key is refused.
    let res = request("tr-ok", "ADA-1", "BOB-1", 1).await.expect("reused");
    assert_eq!(res.status(), 422);
    let body: ErrorBody = res.json().await.expect("error");
    assert_eq!(body.code, "IDEMPOTENCY_KEY_REUSED");

    let closed: TransferView = request("tr-closed", "ADA-1", "BOB-2", 10_00)
        .await
        .expect("transfer")
        .json()
        .await
        .expect("transfer");
    let broke: TransferView = request("tr-broke", "BOB-1", "ADA-2", 1_000_00)
        .await
        .expect("transfer")
        .json()
        .await
        .expect("transfer");
    let res = request("tr-same", "ADA-1", "ADA-1", 1)
        .await
        .expect("transfer");
    assert_eq!(res.status(), 422);
    let body: ErrorBody = res.json().await.expect("error");
    assert_eq!(body.code, "SAME_ACCOUNT");

    let settled = |id: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let view: TransferView = http
                    .get(format!("{base}/transfers/{id}"))
                    .send()
                    .await
                    .expect("show")
                    .json()
                    .await
                    .expect("transfer");
                if view.status.is_finished() {
                    return view;
                }
                assert!(Instant::now() < deadline, "not settled: {view:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let ok = settled(ok.id).await;
    assert_eq!((ok.status, ok.reason), (TransferStatus::Completed, None));
    let closed = settled(closed.id).await;
    assert_eq!(closed.status, TransferStatus::Compensated);
    assert_eq!(closed.reason.as_deref(), Some("ACCOUNT_CLOSED"));
    let broke = settled(broke.id).await;
    assert_eq!(broke.status, TransferStatus::Failed);
    assert_eq!(broke.reason.as_deref(), Some("INSUFFICIENT_FUNDS"));
    let missing = http
        .get(format!("{base}/transfers/nope"))
        .send()
        .await
        .expect("show");
    assert_eq!(missing.status(), 404);

    // The accounts, from their events: only the completed transfer moved money.
    let repo = thalo::Repository::new(running.store.clone());
    for (account, balance) in [
        ("ADA-1", 70_00),
        ("ADA-2", 50_00),
        ("BOB-1", 30_00),
        ("BOB-2", 0),
    ] {
        let loaded = repo
            .load::<bank::BankAccount>(&account.to_owned())
            .await
            .expect("load");
        assert_eq!(loaded.aggregate.balance(), balance, "{account}");
    }

    // The owners view catches up with the store: its checkpoints show every stored event
    // of the accounts and the transfers (the process manager's included).
    running
        .store
        .wait_until_caught_up(
            &running.owners,
            MoneyEvent::aggregate_types(),
            Duration::from_secs(30),
        )
        .await
        .expect("the owners view applies every stored event");
    let owner = |name: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.get(format!("{base}/owners/{name}"))
                .send()
                .await
                .expect("owner")
                .json::<OwnerBalance>()
                .await
                .expect("owner")
        }
    };
    assert_eq!(
        owner("Ada").await,
        OwnerBalance {
            owner: "Ada".into(),
            balance: 120_00,
            in_flight: 0,
            accounts: 2,
        }
    );
    assert_eq!(
        owner("Bob").await,
        OwnerBalance {
            owner: "Bob".into(),
            balance: 30_00,
            in_flight: 0,
            accounts: 1,
        }
    );
    let res = http
        .get(format!("{base}/owners/Nobody"))
        .send()
        .await
        .expect("owner");
    assert_eq!(res.status(), 404);

    shutdown.trigger();
    running.stopped().await.expect("stopped");
}
