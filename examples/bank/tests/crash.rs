//! The bank service (relay and consumer in one process) SIGKILLed and restarted three
//! times under load: within a bound, the read model equals the fold of the stored
//! events. Static group membership (`BANK_INSTANCE_ID`) is what gives the restarted
//! consumer its partitions back: a dead member's session is never expired by some
//! brokers (tansu 0.6), and only after `session.timeout.ms` by others.

mod common;

use common::{env_or, store_in, Service};
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bank::BankAccount;
use serde_json::json;
use sqlx::{PgPool, Row};
use thalo::AggregateType as _;
use thalo_postgres::checkpoint_key;

/// How long the read model may take to match the store after the last restart.
const BOUND: Duration = Duration::from_secs(30);

/// The fold of the stored events: account -> (balance, version).
async fn folded(pool: &PgPool, schema: &str) -> HashMap<String, (i64, i64)> {
    sqlx::query(&format!(
        "SELECT aggregate_id,
                sum(CASE event_type
                    WHEN 'AccountOpened' THEN (payload->>'initial_deposit')::bigint
                    WHEN 'FundsDeposited' THEN (payload->>'amount')::bigint
                    WHEN 'FundsWithdrawn' THEN -(payload->>'amount')::bigint
                    ELSE 0 END)::bigint,
                max(sequence)
         FROM \"{schema}\".events GROUP BY aggregate_id"
    ))
    .fetch_all(pool)
    .await
    .expect("fold")
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

async fn read_model(pool: &PgPool, schema: &str) -> HashMap<String, (i64, i64)> {
    sqlx::query(&format!(
        "SELECT account_number, balance, version FROM \"{schema}\".bank_balances"
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_default()
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_service_recovers_within_the_bound() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let database_url = env_or(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/thalo_test",
    );
    let schema = format!("bank_{id}");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut service = Service {
        port,
        envs: vec![
            ("DATABASE_URL", database_url.clone()),
            ("KAFKA_BROKERS", env_or("KAFKA_BROKERS", "127.0.0.1:9092")),
            ("BANK_SCHEMA", schema.clone()),
            ("BANK_LISTEN", format!("127.0.0.1:{port}")),
            ("BANK_TOPIC_PREFIX", format!("crash-{id}-")),
            ("BANK_GROUP_PREFIX", format!("bank-{id}.")),
            ("BANK_INSTANCE_ID", format!("bank-crash-{id}")),
        ],
        log: std::env::temp_dir().join(format!("bank-crash-{id}.log")),
        child: None,
    };
    let pool = PgPool::connect(&database_url)
        .await
        .expect("Postgres at DATABASE_URL (these tests never skip)");
    service.spawn().await;

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let accounts: Vec<String> = (0..5).map(|a| format!("ACC-{a}")).collect();
    for account in &accounts {
        let opened = http
            .post(format!("{base}/accounts"))
            .json(&json!({"account_number": account, "owner": "Ada", "initial_deposit": 100}))
            .send()
            .await
            .expect("open");
        assert_eq!(opened.status(), 201);
    }

    // Load: deposits all along, through the kills (failed requests are fine: the check
    // is against what was stored).
    let loading = Arc::new(AtomicBool::new(true));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn({
        let (http, base, accounts) = (http.clone(), base.clone(), accounts.clone());
        let (loading, acknowledged) = (Arc::clone(&loading), Arc::clone(&acknowledged));
        async move {
            let mut i = 0_usize;
            while loading.load(Ordering::SeqCst) {
                let account = &accounts[i % accounts.len()];
                i += 1;
                let sent = http
                    .post(format!("{base}/accounts/{account}/deposit"))
                    .json(&json!({"amount": 1}))
                    .send()
                    .await;
                match sent {
                    Ok(res) if res.status().is_success() => {
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    });

    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        service.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        service.spawn().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    loading.store(false, Ordering::SeqCst);
    load.await.expect("load");
    let restarted = Instant::now();

    let expected = folded(&pool, &schema).await;
    let stored: i64 = expected.values().map(|(_, v)| v - 1).sum();
    assert!(
        stored as u64 >= acknowledged.load(Ordering::SeqCst),
        "every acknowledged deposit is stored"
    );
    assert!(stored > 20, "the load ran: {stored} deposits");
    // The balances' checkpoints show every stored event within the bound; then the read
    // model is the fold.
    let store = store_in(&pool, &schema);
    let key = checkpoint_key("bank_balances", bank::pg::BALANCES_VERSION);
    let waited = store
        .wait_until_caught_up_by_key(
            &key,
            &[BankAccount::TYPE],
            BOUND.saturating_sub(restarted.elapsed()),
        )
        .await;
    let actual = read_model(&pool, &schema).await;
    let events = match waited {
        Ok(events) => events,
        Err(err) => panic!(
            "the read model did not catch up within {BOUND:?}: {err}\nexpected {expected:?}\nactual   {actual:?}\n{}",
            std::fs::read_to_string(&service.log).unwrap_or_default()
        ),
    };
    assert_eq!(
        events as i64,
        expected.values().map(|(_, version)| version).sum::<i64>(),
        "it waited for every stored event"
    );
    assert_eq!(actual, expected, "the read model is the fold of the store");
    eprintln!(
        "read model equal to the store {:?} after the last restart",
        restarted.elapsed()
    );

    service.kill().await;
    let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await;
    let _ = std::fs::remove_file(&service.log);
}
