//! Transfers through crashes: clients request many concurrent transfers between a few
//! accounts (some to closed accounts), and deposits and withdrawals from outside,
//! retrying each with the same `Idempotency-Key` until it is answered, while the
//! `bank serve` binary is SIGKILLed and restarted three times. Once it settles, the
//! store shows that money was conserved (what the accounts hold is what came in from
//! outside minus what went out), every transfer finished (completed, compensated, or
//! failed with nothing moved), every keyed command was applied exactly once and no timer
//! fired twice (no transfer refunded twice); and once the balances projection and the
//! `owners` view have caught up, both equal the fold of the events. Twice: with a 1.5 s
//! transfer timeout, and with a 1 ms one, where most deposits race their timer.

// Amounts in cents are written as `dollars_cents` (`100_00` is $100.00).
#![allow(clippy::inconsistent_digit_grouping)]

mod common;

use common::{env_or, store_in, Service};
use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bank::http::BalanceView;
use bank::owners::{OwnerBalance, PgOwners};
use bank::{BankAccount, MoneyEvent};
use serde_json::json;
use sqlx::{PgPool, Row};
use thalo::{AggregateType as _, EventSet as _};
use thalo_postgres::checkpoint_key;

/// How long the transfers may take to settle after the last restart.
const BOUND: Duration = Duration::from_secs(30);

/// Accounts with money, and what each was opened with (money from outside, with the
/// deposits made during the load).
const ACCOUNTS: [&str; 4] = ["ACC-0", "ACC-1", "ACC-2", "ACC-3"];
const INITIAL: i64 = 500_00;

/// The owner of the `i`th account of `ACCOUNTS` then `CLOSED`: three owners, two of
/// them with a closed account.
fn owner_of(i: usize) -> String {
    format!("Owner-{}", i % 3)
}

/// Accounts closed before the transfers start: transfers to them are compensated.
const CLOSED: [&str; 2] = ["SHUT-0", "SHUT-1"];

/// One transfer as the store tells it: its last event, and its account legs.
#[derive(Debug, Default)]
struct Settled {
    amount: i64,
    outcome: Option<String>,
    reason: Option<String>,
    withdrawn: usize,
    deposited: usize,
    refunded: usize,
}

async fn transfers(pool: &PgPool, schema: &str) -> BTreeMap<String, Settled> {
    let mut transfers: BTreeMap<String, Settled> = BTreeMap::new();
    let rows = sqlx::query(&format!(
        "SELECT aggregate_type, aggregate_id, event_type, payload::text
         FROM \"{schema}\".events ORDER BY position"
    ))
    .fetch_all(pool)
    .await
    .expect("events");
    for row in rows {
        let (kind, id, event): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let payload: serde_json::Value =
            serde_json::from_str(&row.get::<String, _>(3)).expect("payload");
        if kind == "transfer" {
            let t = transfers.entry(id).or_default();
            match event.as_str() {
                "TransferRequested" => t.amount = payload["amount"].as_i64().expect("amount"),
                "TransferCompleted" | "TransferCompensated" | "TransferFailed" => {
                    assert!(t.outcome.is_none(), "a transfer finished twice");
                    t.outcome = Some(event);
                    t.reason = payload["reason"].as_str().map(str::to_owned);
                }
                _ => {}
            }
        } else if let Some(transfer) = payload["transfer"].as_str() {
            let t = transfers.entry(transfer.to_owned()).or_default();
            match event.as_str() {
                "TransferWithdrawn" => t.withdrawn += 1,
                "TransferDeposited" => t.deposited += 1,
                "TransferRefunded" => t.refunded += 1,
                other => panic!("unexpected {other}"),
            }
        }
    }
    transfers
}

/// One account as the balances read model shows it (`GET /accounts`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Account {
    owner: String,
    balance: i64,
    closed: bool,
    version: u64,
}

impl From<BalanceView> for Account {
    fn from(row: BalanceView) -> Self {
        Account {
            owner: row.owner,
            balance: row.balance,
            closed: row.closed,
            version: row.version,
        }
    }
}

/// Every account as its events tell it: what the read model's rows must be.
async fn accounts(pool: &PgPool, schema: &str) -> BTreeMap<String, Account> {
    let rows = sqlx::query(&format!(
        "SELECT aggregate_id, event_type, payload::text, sequence
         FROM \"{schema}\".events WHERE aggregate_type = 'bank_account' ORDER BY position"
    ))
    .fetch_all(pool)
    .await
    .expect("account events");
    let mut accounts: BTreeMap<String, Account> = BTreeMap::new();
    for row in rows {
        let (id, event): (String, String) = (row.get(0), row.get(1));
        let payload: serde_json::Value =
            serde_json::from_str(&row.get::<String, _>(2)).expect("payload");
        let amount = payload["amount"].as_i64().unwrap_or(0);
        let account = accounts.entry(id).or_default();
        account.version = u64::try_from(row.get::<i64, _>(3)).expect("sequence");
        match event.as_str() {
            "AccountOpened" => {
                account.owner = payload["owner"].as_str().expect("owner").to_owned();
                account.balance = payload["initial_deposit"].as_i64().expect("deposit");
            }
            "FundsDeposited" | "TransferDeposited" | "TransferRefunded" => {
                account.balance += amount;
            }
            "FundsWithdrawn" | "TransferWithdrawn" => account.balance -= amount,
            "AccountClosed" => account.closed = true,
            other => panic!("unexpected {other}"),
        }
    }
    accounts
}

/// The deposits (positive) and withdrawals (negative) from outside that the store holds,
/// by the command id (the `Idempotency-Key`) of their event.
async fn outside(pool: &PgPool, schema: &str) -> BTreeMap<String, i64> {
    let mut moves = BTreeMap::new();
    let rows = sqlx::query(&format!(
        "SELECT metadata->>'command_id', event_type, (payload->>'amount')::bigint
         FROM \"{schema}\".events
         WHERE event_type IN ('FundsDeposited', 'FundsWithdrawn') ORDER BY position"
    ))
    .fetch_all(pool)
    .await
    .expect("deposits and withdrawals");
    for row in rows {
        let key: Option<String> = row.get(0);
        let key = key.expect("a deposit or withdrawal without a command id");
        let amount: i64 = row.get(2);
        let amount = if row.get::<String, _>(1) == "FundsDeposited" {
            amount
        } else {
            -amount
        };
        assert!(
            moves.insert(key.clone(), amount).is_none(),
            "{key} applied twice"
        );
    }
    moves
}

/// Posts until the service gives an answer that is not a failure to retry: the same
/// key every time, so a request that was stored before a crash is replayed, not
/// repeated.
async fn until_answered(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sent = http
            .post(url)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await;
        if let Ok(res) = sent {
            let status = res.status().as_u16();
            if status < 500 && status != 409 {
                if let Ok(body) = res.json().await {
                    return (status, body);
                }
            }
        }
        assert!(Instant::now() < deadline, "{key} was never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deposits well within the timeout: transfers complete, or are compensated at once
/// when the deposit is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfers_survive_sigkill_exactly_once() {
    let outcomes = crash_under_transfers(1500).await;
    assert!(
        outcomes.get("completed").is_some_and(|n| *n > 0),
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .get("compensated ACCOUNT_CLOSED")
            .is_some_and(|n| *n > 0),
        "{outcomes:?}"
    );
}

/// A 1 ms timeout: the timer fires before the process manager sees most withdrawals
/// (durable timers through the kills), and refunds them once; the deposit that would
/// have followed never happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timers_survive_sigkill_exactly_once() {
    let outcomes = crash_under_transfers(1).await;
    assert!(
        outcomes
            .get("compensated TIMED_OUT")
            .is_some_and(|n| *n > 0),
        "{outcomes:?}"
    );
}

/// The `(text, count)` rows of a query such as `SELECT x, count(*) ... GROUP BY x`.
async fn counted(pool: &PgPool, sql: &str) -> Vec<(String, i64)> {
    sqlx::query(sql)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Runs the transfers through three SIGKILLs with the transfer timeout `timeout_ms`,
/// checks every invariant, and returns how many transfers ended how (`completed`,
/// `compensated <reason>`, `failed <reason>`).
async fn crash_under_transfers(timeout_ms: u64) -> BTreeMap<String, usize> {
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
            ("BANK_TOPIC_PREFIX", format!("transfers-crash-{id}-")),
            ("BANK_GROUP_PREFIX", format!("bank-{id}.")),
            ("BANK_INSTANCE_ID", format!("bank-transfers-crash-{id}")),
            ("BANK_TRANSFER_TIMEOUT_MS", timeout_ms.to_string()),
        ],
        log: std::env::temp_dir().join(format!("bank-transfers-crash-{id}.log")),
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
    for (i, account) in ACCOUNTS.iter().chain(&CLOSED).enumerate() {
        let initial = if account.starts_with("ACC") {
            INITIAL
        } else {
            0
        };
        let owner = owner_of(i);
        let body = json!({"account_number": account, "owner": owner, "initial_deposit": initial});
        let (status, _) = until_answered(
            &http,
            &format!("{base}/accounts"),
            &format!("open-{account}"),
            &body,
        )
        .await;
        assert_eq!(status, 201, "{account}");
    }
    for account in CLOSED {
        let url = format!("{base}/accounts/{account}/close");
        let (status, _) =
            until_answered(&http, &url, &format!("close-{account}"), &json!({})).await;
        assert_eq!(status, 200, "{account}");
    }

    // Clients: each requests transfers one after the other, retrying each with its key
    // until it is accepted, through the kills.
    let running = Arc::new(AtomicBool::new(true));
    let accepted: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let clients: Vec<_> = (0..6_usize)
        .map(|client| {
            let (http, url) = (http.clone(), format!("{base}/transfers"));
            let (running, accepted) = (Arc::clone(&running), Arc::clone(&accepted));
            tokio::spawn(async move {
                let mut n = 0_usize;
                while running.load(Ordering::SeqCst) {
                    let from = ACCOUNTS[(client + n) % ACCOUNTS.len()];
                    let to = if n % 5 == 4 {
                        CLOSED[(client + n) % CLOSED.len()]
                    } else {
                        ACCOUNTS[(client + n + 1 + n % 3) % ACCOUNTS.len()]
                    };
                    // Up to $150.00: some withdrawals find too little.
                    let amount = ((client * 7 + n * 13) % 150 + 1) as i64 * 1_00;
                    let key = format!("transfer-{client}-{n}");
                    let body = json!({"from": from, "to": to, "amount": amount});
                    let (status, answer) = until_answered(&http, &url, &key, &body).await;
                    assert_eq!(status, 202, "{key}: {answer}");
                    let id = answer["id"].as_str().expect("id").to_owned();
                    accepted.lock().unwrap().insert(key, id);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();

    // Outside money: deposits into the open accounts, and withdrawals (some refused for
    // want of money), each retried under its key like the transfers. What was answered
    // 200 moved money, once: key -> cents in (positive) or out (negative).
    let moved: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let tellers: Vec<_> = (0..2_usize)
        .map(|teller| {
            let (http, base) = (http.clone(), base.clone());
            let (running, moved) = (Arc::clone(&running), Arc::clone(&moved));
            tokio::spawn(async move {
                let mut n = 0_usize;
                while running.load(Ordering::SeqCst) {
                    let account = ACCOUNTS[(teller * 3 + n) % ACCOUNTS.len()];
                    let amount = ((teller * 11 + n * 17) % 80 + 1) as i64 * 1_00;
                    let (kind, sign) = if n % 3 == 2 {
                        ("withdraw", -1)
                    } else {
                        ("deposit", 1)
                    };
                    let key = format!("{kind}-{teller}-{n}");
                    let url = format!("{base}/accounts/{account}/{kind}");
                    let body = json!({ "amount": amount });
                    let (status, answer) = until_answered(&http, &url, &key, &body).await;
                    match (kind, status) {
                        (_, 200) => {
                            moved.lock().unwrap().insert(key, sign * amount);
                        }
                        ("withdraw", 422) => {
                            assert_eq!(answer["code"], "INSUFFICIENT_FUNDS", "{key}: {answer}");
                        }
                        _ => panic!("{key}: {status} {answer}"),
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            })
        })
        .collect();

    // Timers pending right before each SIGKILL (the transfers' timeouts), by id.
    let mut pending_at_kill: BTreeSet<String> = BTreeSet::new();
    let mut restarts = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let pending: Vec<String> =
            sqlx::query_scalar(&format!("SELECT id::text FROM \"{schema}\".process_timers"))
                .fetch_all(&pool)
                .await
                .expect("pending timers");
        pending_at_kill.extend(pending);
        service.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A consumer group (and static member id) per start: tansu 0.6 sometimes wedges
        // a static member's group after a SIGKILL under load, and no start of the
        // service is given partitions again (RELIABILITY.md, "Static group membership
        // on the test broker"; the deployed configuration, one group across restarts,
        // is what `crash.rs` runs). A new group reads the topics from the start and
        // skips, by the stream checkpoints, every event already applied.
        restarts += 1;
        for (key, value) in &mut service.envs {
            match *key {
                "BANK_GROUP_PREFIX" => *value = format!("bank-{id}-{restarts}."),
                "BANK_INSTANCE_ID" => *value = format!("bank-transfers-crash-{id}-{restarts}"),
                _ => {}
            }
        }
        service.spawn().await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    running.store(false, Ordering::SeqCst);
    for client in clients.into_iter().chain(tellers) {
        client.await.expect("client");
    }
    let restarted = Instant::now();
    let accepted = accepted.lock().unwrap().clone();
    let moved = moved.lock().unwrap().clone();
    eprintln!(
        "{} transfers, {} deposits and withdrawals accepted; {} timers pending at the kills",
        accepted.len(),
        moved.len(),
        pending_at_kill.len()
    );
    // The kills hit transfers in flight, their timers pending (with the 1.5 s timeout;
    // with 1 ms most fire before a kill can see them). They all end below: fired once
    // or cancelled.
    if timeout_ms > 1 {
        assert!(!pending_at_kill.is_empty(), "no timer pending at a kill");
    }
    let ids: BTreeSet<String> = accepted.values().cloned().collect();
    assert_eq!(ids.len(), accepted.len(), "one transfer per key");
    assert!(
        accepted.len() > 50,
        "the load ran: {} transfers",
        accepted.len()
    );

    // Settle: every accepted transfer finishes.
    let settled = loop {
        let settled = transfers(&pool, &schema).await;
        let open: Vec<_> = ids
            .iter()
            .filter(|id| settled.get(*id).is_none_or(|t| t.outcome.is_none()))
            .collect();
        if open.is_empty() {
            break settled;
        }
        assert!(
            restarted.elapsed() < BOUND,
            "{} transfers did not settle within {BOUND:?}, e.g. {:?}\n{}",
            open.len(),
            settled.get(open[0]),
            std::fs::read_to_string(&service.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "{} transfers settled {:?} after the last restart",
        ids.len(),
        restarted.elapsed()
    );

    // Exactly the accepted transfers were stored, and each finished as it should.
    let stored: BTreeSet<String> = settled.keys().cloned().collect();
    assert_eq!(
        stored, ids,
        "the store holds exactly the accepted transfers"
    );
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (id, t) in &settled {
        let outcome = t.outcome.as_deref().expect("settled");
        let name = outcome.trim_start_matches("Transfer").to_lowercase();
        let name = match &t.reason {
            Some(reason) => format!("{name} {reason}"),
            None => name,
        };
        *outcomes.entry(name).or_default() += 1;
        let legs = (t.withdrawn, t.deposited, t.refunded);
        match outcome {
            "TransferCompleted" => assert_eq!(legs, (1, 1, 0), "{id}: {t:?}"),
            "TransferCompensated" => assert_eq!(legs, (1, 0, 1), "{id}: {t:?}"),
            "TransferFailed" => {
                assert_eq!(legs, (0, 0, 0), "{id}: nothing moved: {t:?}");
                assert_eq!(t.reason.as_deref(), Some("INSUFFICIENT_FUNDS"), "{id}");
            }
            other => panic!("{id}: {other}"),
        }
    }
    eprintln!("timeout {timeout_ms} ms: {outcomes:?}");
    // Every deposit and withdrawal answered 200 was stored once, under its key, and
    // nothing else came in or went out.
    assert_eq!(
        outside(&pool, &schema).await,
        moved,
        "the store holds exactly the accepted deposits and withdrawals"
    );
    assert!(
        moved.values().filter(|cents| **cents > 0).count() > 10,
        "the deposits ran: {moved:?}"
    );
    // Money is conserved: what is in the accounts is what came in from outside (the
    // opening deposits and the deposits) minus what went out (the withdrawals).
    let folded = accounts(&pool, &schema).await;
    let total: i64 = folded.values().map(|a| a.balance).sum();
    let from_outside = INITIAL * ACCOUNTS.len() as i64 + moved.values().sum::<i64>();
    assert_eq!(total, from_outside, "{folded:?}");
    assert!(folded.values().all(|a| a.balance >= 0), "{folded:?}");
    for account in CLOSED {
        assert_eq!(folded[account].balance, 0, "{account} got nothing");
    }

    // No command was applied twice: no two events under one command id.
    let twice = counted(
        &pool,
        &format!(
            "SELECT metadata->>'command_id', count(*) FROM \"{schema}\".events
             WHERE metadata ? 'command_id' GROUP BY 1 HAVING count(*) > 1"
        ),
    )
    .await;
    assert!(twice.is_empty(), "commands applied twice: {twice:?}");
    // And that check saw the commands: every event here was caused by a keyed command
    // (the clients' `Idempotency-Key`s, and the process manager's keys derived from the
    // events it reacts to), the transfers' legs and the deposits included.
    let keyed: BTreeMap<String, (i64, i64)> = sqlx::query(&format!(
        "SELECT event_type, count(*), count(*) FILTER (WHERE metadata ? 'command_id')
         FROM \"{schema}\".events GROUP BY 1"
    ))
    .fetch_all(&pool)
    .await
    .expect("events by type")
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect();
    for event in [
        "AccountOpened",
        "AccountClosed",
        "FundsDeposited",
        "TransferRequested",
        "TransferWithdrawn",
        "TransferRefunded",
    ] {
        assert!(
            keyed.get(event).is_some_and(|(n, _)| *n > 0),
            "no {event}: {keyed:?}"
        );
    }
    for (event, (n, with_key)) in &keyed {
        assert_eq!(n, with_key, "{event} without a command id: {keyed:?}");
    }

    // The process manager sees the transfers' last events and completes every
    // instance, which leaves no timer to fire.
    loop {
        let (timers, unfinished): (i64, i64) = sqlx::query(&format!(
            "SELECT (SELECT count(*) FROM \"{schema}\".process_timers),
                    (SELECT count(*) FROM \"{schema}\".process_states WHERE NOT completed)"
        ))
        .fetch_one(&pool)
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("process tables");
        if (timers, unfinished) == (0, 0) {
            break;
        }
        assert!(
            restarted.elapsed() < BOUND,
            "{timers} timers and {unfinished} running instances left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The read models catch up with the store (by their checkpoints), and then equal
    // its fold: the balances per account, the owners' view per owner.
    let store = store_in(&pool, &schema);
    let balances_key = checkpoint_key("bank_balances", bank::pg::BALANCES_VERSION);
    let owners = PgOwners::new(&store).await.expect("the owners view");
    let caught_up = async {
        store
            .wait_until_caught_up_by_key(&balances_key, &[BankAccount::TYPE], BOUND)
            .await?;
        store
            .wait_until_caught_up(&owners, MoneyEvent::aggregate_types(), BOUND)
            .await
    };
    if let Err(err) = caught_up.await {
        // What the service says of its consumer (joined? partitions assigned?).
        let readiness = match http.get(format!("{base}/readyz")).send().await {
            Ok(res) => res.text().await.unwrap_or_default(),
            Err(err) => err.to_string(),
        };
        panic!(
            "the read models did not catch up within {BOUND:?}: {err}\n/readyz: {readiness}\n{}",
            std::fs::read_to_string(&service.log).unwrap_or_default()
        );
    }
    let folded = accounts(&pool, &schema).await;
    let rows: Vec<BalanceView> = http
        .get(format!("{base}/accounts"))
        .send()
        .await
        .expect("list the accounts")
        .json()
        .await
        .expect("rows");
    let read_model: BTreeMap<String, Account> = rows
        .into_iter()
        .map(|row| (row.account_number.clone(), row.into()))
        .collect();
    assert_eq!(read_model, folded, "the balances are the fold of the store");
    let mut expected: BTreeMap<String, OwnerBalance> = BTreeMap::new();
    for account in folded.values() {
        let owner = expected
            .entry(account.owner.clone())
            .or_insert_with(|| OwnerBalance {
                owner: account.owner.clone(),
                balance: 0,
                in_flight: 0,
                accounts: 0,
            });
        owner.balance += account.balance;
        owner.accounts += i64::from(!account.closed);
    }
    assert_eq!(expected.len(), 3, "{expected:?}");
    for (name, owner) in &expected {
        let res = http
            .get(format!("{base}/owners/{name}"))
            .send()
            .await
            .expect("owner");
        assert_eq!(res.status(), 200, "{name}");
        let view: OwnerBalance = res.json().await.expect("owner");
        assert_eq!(&view, owner, "the owners view is the fold of the store");
    }
    eprintln!(
        "read models equal to the store {:?} after the last restart",
        restarted.elapsed()
    );

    // needs migration 0006 (process_timer_firings)
    // ---------------------------------------------------------------------------------
    // No timer fired twice: the runner records each firing under the timer's id, in the
    // transaction that saves what the firing did, so a firing replayed after a SIGKILL
    // would show as a second row (or fail the firing, and the transfers would not have
    // settled).
    let fired_twice = counted(
        &pool,
        &format!(
            "SELECT id::text, count(*) FROM \"{schema}\".process_timer_firings
             GROUP BY id HAVING count(*) > 1"
        ),
    )
    .await;
    assert!(
        fired_twice.is_empty(),
        "timers fired twice: {fired_twice:?}"
    );
    let fired: BTreeMap<String, i64> = counted(
        &pool,
        &format!("SELECT id::text, count(*) FROM \"{schema}\".process_timer_firings GROUP BY id"),
    )
    .await
    .into_iter()
    .collect();
    // Each transfer compensated for its timeout was refunded by one firing.
    let timed_out = outcomes.get("compensated TIMED_OUT").copied().unwrap_or(0);
    assert!(
        fired.len() >= timed_out,
        "{timed_out} transfers timed out, {} timers fired",
        fired.len()
    );
    // Timers pending at a SIGKILL that fired after it fired exactly once (the others
    // were cancelled by the transfer's deposit).
    let fired_after_kill: Vec<(&String, i64)> = pending_at_kill
        .iter()
        .filter_map(|id| fired.get(id).map(|n| (id, *n)))
        .collect();
    assert!(
        fired_after_kill.iter().all(|(_, n)| *n == 1),
        "{fired_after_kill:?}"
    );
    eprintln!(
        "timeout {timeout_ms} ms: {} timers fired, {} of the {} pending at a kill",
        fired.len(),
        fired_after_kill.len(),
        pending_at_kill.len()
    );
    if timeout_ms == 1 {
        // The 1 ms run exercised the timers. (Whether one is pending at a kill is luck
        // at 1 ms: a kill sees none in about half the runs.)
        assert!(!fired.is_empty(), "no timer fired");
    }
    // ---------------------------------------------------------------------------------
    // end: needs migration 0006 (process_timer_firings)

    service.kill().await;
    let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await;
    let _ = std::fs::remove_file(&service.log);
    outcomes
}
