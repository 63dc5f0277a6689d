//! A new version of the balances read model is rebuilt from the store while the live
//! version keeps serving reads, takes over once it has caught up, and is then fed by
//! its own consumer group through Kafka.

// Amounts in cents are written as `dollars_cents` (`100_00` is $100.00).
#![allow(clippy::inconsistent_digit_grouping)]

mod common;

use common::env_or;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bank::http::BalanceView;
use bank::service::{start, Running, ServiceConfig};
use bank::BankAccount;
use serde_json::json;
use thalo::{AggregateType as _, Shutdown};
use thalo_postgres::VersionState;

fn config(id: &str, balances_version: u32) -> ServiceConfig {
    ServiceConfig {
        database_url: env_or(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/thalo_test",
        ),
        kafka_brokers: env_or("KAFKA_BROKERS", "127.0.0.1:9092"),
        listen: "127.0.0.1:0".parse().expect("address"),
        schema: format!("bank_{id}"),
        topic_prefix: format!("test-{id}-"),
        group_prefix: format!("bank-{id}."),
        instance_id: format!("bank-test-{id}-v{balances_version}"),
        balances_version,
        ..ServiceConfig::default()
    }
}

async fn service(id: &str, version: u32) -> (Running, Shutdown, String) {
    let shutdown = Shutdown::new();
    let running = start(config(id, version), shutdown.clone())
        .await
        .expect("the service starts (Postgres and a broker are required)");
    let base = format!("http://{}", running.addr);
    (running, shutdown, base)
}

async fn balance(http: &reqwest::Client, base: &str, account: &str) -> Option<BalanceView> {
    let res = http
        .get(format!("{base}/accounts/{account}"))
        .send()
        .await
        .expect("get");
    if res.status() == 404 {
        return None;
    }
    assert_eq!(res.status(), 200);
    Some(res.json().await.expect("row"))
}

/// Waits until the balances version `running` serves has applied every stored account
/// event, by its checkpoints (whoever feeds it: its consumer group, or its rebuild).
async fn wait_until_projected(running: &Running) {
    if let Err(err) = running
        .store
        .wait_until_caught_up(
            &running.balances,
            &[BankAccount::TYPE],
            Duration::from_secs(60),
        )
        .await
    {
        panic!(
            "balances version {} did not apply the stored events: {err}",
            running.balances.version(),
        );
    }
}

async fn stop(running: Running, shutdown: Shutdown) {
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(30), running.stopped())
        .await
        .expect("the service stops on shutdown")
        .expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_balances_version_is_rebuilt_and_takes_over_without_failed_reads() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let http = reqwest::Client::new();

    // Version 1 serves, fed through Kafka.
    let (v1, v1_stop, v1_base) = service(&id, 1).await;
    let accounts: Vec<String> = (0..10).map(|n| format!("ACC-{n}")).collect();
    for account in &accounts {
        let res = http
            .post(format!("{v1_base}/accounts"))
            .json(&json!({"account_number": account, "owner": "Ada", "initial_deposit": 10_00}))
            .send()
            .await
            .expect("open");
        assert_eq!(res.status(), 201);
        for _ in 0..5 {
            let res = http
                .post(format!("{v1_base}/accounts/{account}/deposit"))
                .json(&json!({"amount": 1_00}))
                .send()
                .await
                .expect("deposit");
            assert_eq!(res.status(), 200);
        }
    }
    wait_until_projected(&v1).await;
    for account in &accounts {
        let row = balance(&http, &v1_base, account).await.expect(account);
        assert_eq!((row.balance, row.version), (15_00, 6), "{account}");
    }

    // Readers keep reading through version 1 while version 2 starts beside it.
    let reading = Arc::new(AtomicBool::new(true));
    let reads = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = tokio::spawn({
        let (http, base) = (http.clone(), v1_base.clone());
        let (reading, reads, failures) = (reading.clone(), reads.clone(), failures.clone());
        async move {
            while reading.load(Ordering::SeqCst) {
                match http.get(format!("{base}/accounts")).send().await {
                    Ok(res) if res.status() == 200 => {
                        let rows: Vec<BalanceView> = res.json().await.expect("rows");
                        if rows.len() != 10 || rows.iter().any(|r| r.balance < 15_00) {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("stale or partial: {rows:?}"));
                        }
                    }
                    Ok(res) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", res.status())),
                    Err(err) => failures.lock().unwrap().push(err.to_string()),
                }
                reads.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    let (v2, v2_stop, v2_base) = service(&id, 2).await;
    let store = v2.store.clone();
    // The versions' state, not a read model's rows: version 2 goes live once its rebuild
    // has caught up.
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.live_version("bank_balances").await.unwrap() != Some(2) {
        assert!(Instant::now() < deadline, "version 2 never went live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    reading.store(false, Ordering::SeqCst);
    reader.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "reads failed during the swap: {failures:?}"
    );
    assert!(reads.load(Ordering::SeqCst) > 0);

    // The old deployment goes away; version 2's own consumer group feeds it from Kafka,
    // skipping everything the rebuild applied.
    stop(v1, v1_stop).await;
    let res = http
        .post(format!("{v2_base}/accounts/ACC-0/deposit"))
        .json(&json!({"amount": 7_00}))
        .send()
        .await
        .expect("deposit");
    assert_eq!(res.status(), 200);
    wait_until_projected(&v2).await;
    // Applied once: the row's version is the stream's.
    let acc0 = balance(&http, &v2_base, "ACC-0").await.expect("ACC-0");
    assert_eq!((acc0.balance, acc0.version), (22_00, 7));

    let table = store.schema().qualify("bank_balances_v2");
    let rows: Vec<(String, i64)> = thalo_postgres::sqlx::query_as(&format!(
        "SELECT account_number, balance FROM {table} ORDER BY account_number"
    ))
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 10);
    for (account, cents) in &rows {
        let want = if account == "ACC-0" { 22_00 } else { 15_00 };
        assert_eq!(*cents, want, "{account}");
    }
    let states: Vec<(u32, VersionState)> = store
        .projection_versions("bank_balances")
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.state))
        .collect();
    assert_eq!(
        states,
        [(1, VersionState::Retired), (2, VersionState::Live)]
    );
    stop(v2, v2_stop).await;
}
