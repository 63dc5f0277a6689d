//! The bank service on the real stack: HTTP -> Postgres -> relay -> Kafka -> consumer ->
//! read model in Postgres.

// Amounts in cents are written as `dollars_cents` (`100_00` is $100.00).
#![allow(clippy::inconsistent_digit_grouping)]

mod common;

use common::{env_or, store_in, Service};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use bank::http::{BalanceView, ErrorBody, StoredEvent, CONSISTENCY, CONSISTENCY_PROJECTED};
use bank::service::{start, ServiceConfig};
use serde_json::json;
use thalo::Shutdown;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_over_http_reach_the_read_model_through_kafka() {
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
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let running = start(config, shutdown.clone()).await.expect(
        "the service starts (Postgres at DATABASE_URL and a broker at KAFKA_BROKERS are required)",
    );
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    // Ready (the consumer has joined its group): from now on a command answers with
    // `Consistency: projected` as soon as the read models show it.
    readiness_until(&http, &base, 200).await;

    let opened = http
        .post(format!("{base}/accounts"))
        .header(CONSISTENCY, CONSISTENCY_PROJECTED)
        .json(&json!({"account_number": "ACC-1", "owner": "Ada", "initial_deposit": 100_00}))
        .send()
        .await
        .expect("open");
    assert_eq!(opened.status(), 201);
    let events: Vec<StoredEvent> = opened.json().await.expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "AccountOpened");
    assert_eq!(
        events[0].data,
        json!({"owner": "Ada", "initial_deposit": 100_00})
    );

    for (path, amount) in [("deposit", 50_00), ("withdraw", 30_00), ("deposit", 1)] {
        let res = http
            .post(format!("{base}/accounts/ACC-1/{path}"))
            .header(CONSISTENCY, CONSISTENCY_PROJECTED)
            .json(&json!({ "amount": amount }))
            .send()
            .await
            .expect(path);
        assert_eq!(res.status(), 200, "{path}");
    }
    let rejected = http
        .post(format!("{base}/accounts/ACC-1/withdraw"))
        .header(CONSISTENCY, CONSISTENCY_PROJECTED)
        .json(&json!({"amount": 1_000_00}))
        .send()
        .await
        .expect("withdraw");
    assert_eq!(rejected.status(), 422);
    let body: ErrorBody = rejected.json().await.expect("error body");
    assert_eq!(body.code, "INSUFFICIENT_FUNDS");

    let res = http
        .post(format!("{base}/accounts"))
        .header(CONSISTENCY, CONSISTENCY_PROJECTED)
        .json(&json!({"account_number": "ACC-2", "owner": "Alan"}))
        .send()
        .await
        .expect("open 2");
    assert_eq!(res.status(), 201);
    let res = http
        .post(format!("{base}/accounts/ACC-2/close"))
        .header(CONSISTENCY, CONSISTENCY_PROJECTED)
        .send()
        .await
        .expect("close 2");
    assert_eq!(res.status(), 200);

    // Every command answered once the read model (fed through the outbox, the broker and
    // the consumer) showed it: one read sees them all.
    let balances: Vec<BalanceView> = http
        .get(format!("{base}/accounts"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("rows");
    let rows: Vec<(&str, &str, i64, bool, u64)> = balances
        .iter()
        .map(|r| {
            (
                r.account_number.as_str(),
                r.owner.as_str(),
                r.balance,
                r.closed,
                r.version,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("ACC-1", "Ada", 120_01, false, 4),
            ("ACC-2", "Alan", 0, true, 2)
        ]
    );

    let one: BalanceView = http
        .get(format!("{base}/accounts/ACC-1"))
        .send()
        .await
        .expect("show")
        .json()
        .await
        .expect("row");
    assert_eq!(one.balance, 120_01);
    let missing = http
        .get(format!("{base}/accounts/NOPE"))
        .send()
        .await
        .expect("show");
    assert_eq!(missing.status(), 404);

    // The read model equals the aggregates rebuilt from the store.
    let repo = thalo::Repository::new(running.store.clone());
    for row in &balances {
        let account = repo
            .load::<bank::BankAccount>(&row.account_number)
            .await
            .expect("load");
        assert_eq!(account.aggregate.balance(), row.balance);
        assert_eq!(account.version, row.version);
    }

    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(30), running.stopped())
        .await
        .expect("the service stops on shutdown")
        .expect("clean stop");
}

/// Bad input gets a clear 4xx and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_rejected_and_stores_nothing() {
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
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let running = start(config, shutdown.clone())
        .await
        .expect("the service starts");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    let open = |body: serde_json::Value| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.post(format!("{base}/accounts"))
                .json(&body)
                .send()
                .await
                .expect("open")
        }
    };
    let rejected = |res: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(res.status(), status, "{code}");
        let body: ErrorBody = res.json().await.expect("error body");
        assert_eq!(body.code, code, "{}", body.message);
    };

    // The largest balance there is, then a deposit that would overflow it.
    let res =
        open(json!({"account_number": "RICH", "owner": "Ada", "initial_deposit": i64::MAX})).await;
    assert_eq!(res.status(), 201);
    let res = http
        .post(format!("{base}/accounts/RICH/deposit"))
        .json(&json!({"amount": 1}))
        .send()
        .await
        .expect("deposit");
    rejected(res, 422, "BALANCE_OVERFLOW").await;

    rejected(
        open(json!({"account_number": "NUL", "owner": "Ada\u{0}", "initial_deposit": 1})).await,
        422,
        "INVALID_OWNER",
    )
    .await;
    rejected(
        open(json!({"account_number": "", "owner": "Ada"})).await,
        422,
        "INVALID_ACCOUNT_NUMBER",
    )
    .await;
    // On its own connection: the server answers 413 before reading the body and then
    // closes the connection, which a pooled client could pick for the next request.
    let res = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
        .post(format!("{base}/accounts"))
        .json(&json!({"account_number": "HUGE", "owner": "x".repeat(1_500_000)}))
        .send()
        .await
        .expect("open");
    rejected(res, 413, "BODY_TOO_LARGE").await;
    let res = http
        .post(format!("{base}/accounts"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("open");
    rejected(res, 400, "INVALID_BODY").await;
    let res = http
        .post(format!("{base}/accounts/RICH/withdraw"))
        .json(&json!({"amount": "a lot"}))
        .send()
        .await
        .expect("withdraw");
    rejected(res, 400, "INVALID_BODY").await;

    // Only the one good command is stored.
    let stored = thalo::EventStore::read_all(&running.store, 0, 100)
        .await
        .expect("read");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].aggregate_id, "RICH");

    shutdown.trigger();
    running.stopped().await.expect("stopped");
}

/// `Idempotency-Key`: a retried request answers with the first result (and
/// `Idempotent-Replayed: true`) and the money moves once, even when the retries race and
/// when deciding again would now be rejected; another command under a used key and a
/// malformed key are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_make_retries_safe() {
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
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let running = start(config, shutdown.clone())
        .await
        .expect("the service starts");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let post = |path: &str, key: &str, body: serde_json::Value| {
        http.post(format!("{base}{path}"))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let replayed = |res: &reqwest::Response| {
        res.headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    };

    let health = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.expect("body"), "ok");

    let open = json!({"account_number": "IDEM", "owner": "Ada", "initial_deposit": 0});
    let first = post("/accounts", "open-1", open.clone())
        .await
        .expect("open");
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first));
    let first: Vec<StoredEvent> = first.json().await.expect("events");
    let retry = post("/accounts", "open-1", open).await.expect("retry");
    assert_eq!(
        retry.status(),
        201,
        "a retry answers like the first execution"
    );
    assert!(replayed(&retry));
    let retry: Vec<StoredEvent> = retry.json().await.expect("events");
    assert_eq!(retry[0].id, first[0].id);

    // Five racing copies of one deposit, then two more retries: the money moves once.
    let deposits: Vec<_> = (0..5)
        .map(|_| {
            let request = http
                .post(format!("{base}/accounts/IDEM/deposit"))
                .header("Idempotency-Key", "dep-1")
                .json(&json!({"amount": 100_00}));
            tokio::spawn(request.send())
        })
        .collect();
    let mut answers = Vec::new();
    for task in deposits {
        let res = task.await.expect("task").expect("deposit");
        assert_eq!(res.status(), 200);
        answers.push((
            replayed(&res),
            res.json::<Vec<StoredEvent>>().await.expect("events"),
        ));
    }
    assert_eq!(answers.iter().filter(|(replayed, _)| !replayed).count(), 1);
    assert!(answers
        .iter()
        .all(|(_, events)| events[0].id == answers[0].1[0].id));

    // A withdrawal of everything; its retry is answered from the record, although
    // deciding it again would be rejected now.
    let res = post("/accounts/IDEM/withdraw", "wd-1", json!({"amount": 100_00}))
        .await
        .expect("withdraw");
    assert_eq!(res.status(), 200);
    let res = post("/accounts/IDEM/withdraw", "wd-1", json!({"amount": 100_00}))
        .await
        .expect("retry");
    assert_eq!(res.status(), 200);
    assert!(replayed(&res));

    let res = post("/accounts/IDEM/deposit", "dep-1", json!({"amount": 5}))
        .await
        .expect("another command under a used key");
    assert_eq!(res.status(), 422);
    let body: ErrorBody = res.json().await.expect("error");
    assert_eq!(body.code, "IDEMPOTENCY_KEY_REUSED", "{}", body.message);
    let res = post("/accounts/IDEM/deposit", "has space", json!({"amount": 5}))
        .await
        .expect("bad key");
    assert_eq!(res.status(), 400);
    let body: ErrorBody = res.json().await.expect("error");
    assert_eq!(body.code, "INVALID_IDEMPOTENCY_KEY", "{}", body.message);

    let account = thalo::Repository::new(running.store.clone())
        .load::<bank::BankAccount>(&"IDEM".to_owned())
        .await
        .expect("load");
    assert_eq!(account.version, 3, "open, one deposit, one withdrawal");
    assert_eq!(account.aggregate.balance(), 0);

    shutdown.trigger();
    running.stopped().await.expect("stopped");
}

/// A service configuration isolated by `id` (schema, topics, group, instance).
fn isolated(id: &str) -> ServiceConfig {
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
        instance_id: format!("bank-test-{id}"),
        // One recorder per process, shared by the services of these tests.
        metrics: Some(bank::prometheus::install().expect("the Prometheus recorder")),
        ..ServiceConfig::default()
    }
}

/// Samples of a Prometheus text exposition: (name, sorted labels) -> value.
type Samples = std::collections::HashMap<(String, Vec<(String, String)>), f64>;

/// The samples of a Prometheus text exposition.
fn samples(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut labels: Vec<(String, String)> = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        labels.sort();
        samples.insert(
            (name.to_owned(), labels),
            value.parse().expect("a sample value"),
        );
    }
    samples
}

fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    samples.get(&(name.to_owned(), labels)).copied()
}

/// `GET /readyz` until it answers `status` (or the deadline passes).
async fn readiness_until(
    http: &reqwest::Client,
    base: &str,
    status: u16,
) -> bank::readiness::ReadinessReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let res = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        let got = res.status().as_u16();
        let report: bank::readiness::ReadinessReport = res.json().await.expect("report");
        assert_eq!(report.ready, got == 200, "{report:?}");
        if got == status {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not answer {status}: {got} {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `/readyz` is 200 once Postgres, the broker, the relay and the consumer are up, and
/// 503 (shutdown) as soon as shutdown begins; `/metrics` counts the commands, the
/// relay's messages and the consumer's events of this service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_readiness_follow_the_pipeline() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let shutdown = Shutdown::new();
    let running = start(isolated(&id), shutdown.clone()).await.expect(
        "the service starts (Postgres at DATABASE_URL and a broker at KAFKA_BROKERS are required)",
    );
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    let ready = readiness_until(&http, &base, 200).await;
    let names: Vec<&str> = ready.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["shutdown", "postgres", "kafka", "relay", "consumer"],
        "{ready:?}"
    );
    assert!(ready.checks.iter().all(|c| c.ok), "{ready:?}");
    let relay = ready.check("relay").expect("relay check");
    assert!(relay.detail.starts_with("leader"), "{relay:?}");

    let opened = http
        .post(format!("{base}/accounts"))
        .header(CONSISTENCY, CONSISTENCY_PROJECTED)
        .json(&json!({"account_number": "M-1", "owner": "Ada", "initial_deposit": 10_00}))
        .send()
        .await
        .expect("open");
    assert_eq!(opened.status(), 201);
    let deposited = http
        .post(format!("{base}/accounts/M-1/deposit"))
        .header(CONSISTENCY, CONSISTENCY_PROJECTED)
        .json(&json!({"amount": 5_00}))
        .send()
        .await
        .expect("deposit");
    assert_eq!(deposited.status(), 200);

    // The two events reached the read model through the relay and the consumer before
    // the commands answered.
    let res = http
        .get(format!("{base}/accounts/M-1"))
        .send()
        .await
        .expect("show");
    assert_eq!(res.status(), 200);
    let row: BalanceView = res.json().await.expect("row");
    assert_eq!((row.balance, row.version), (15_00, 2));

    // The counters are bumped right after the work they count: poll briefly.
    let topic = format!("test-{id}-bank_account");
    let consumer = format!("bank-{id}.bank_balances");
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = scrape(&http, &base).await;
        let published = sample(
            &metrics,
            "thalo_relay_published_total",
            &[("topic", &topic)],
        );
        let applied = sample(
            &metrics,
            "thalo_consumer_handled_total",
            &[("consumer", &consumer), ("outcome", "applied")],
        );
        if published >= Some(2.0) && applied == Some(2.0) {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "published {published:?}, applied {applied:?}: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Shared by the services of this process: at least this test's two commands.
    let bank = [("aggregate_type", "bank_account")];
    let stored = sample(
        &metrics,
        "thalo_commands_total",
        &[("aggregate_type", "bank_account"), ("outcome", "stored")],
    );
    assert!(stored >= Some(2.0), "{stored:?}");
    assert!(sample(&metrics, "thalo_appends_total", &bank) >= Some(2.0));
    assert!(sample(&metrics, "thalo_append_events_total", &bank) >= Some(2.0));
    // Histograms, with the buckets set for `_seconds`.
    let commands_timed = sample(
        &metrics,
        "thalo_command_duration_seconds_bucket",
        &[("aggregate_type", "bank_account"), ("le", "+Inf")],
    );
    assert!(commands_timed >= Some(2.0), "{commands_timed:?}");
    let handled_timed = sample(
        &metrics,
        "thalo_consumer_handle_duration_seconds_count",
        &[("consumer", &consumer)],
    );
    assert!(handled_timed >= Some(1.0), "{handled_timed:?}");
    // Nothing went wrong on the way.
    for outcome in ["failed", "dead_lettered", "parked"] {
        let n = sample(
            &metrics,
            "thalo_consumer_handled_total",
            &[("consumer", &consumer), ("outcome", outcome)],
        );
        assert_eq!(n, Some(0.0), "{outcome}");
    }
    assert_eq!(
        sample(
            &metrics,
            "thalo_dead_letters_total",
            &[("consumer", &consumer)]
        ),
        Some(0.0)
    );
    assert!(
        sample(&metrics, "thalo_relay_is_leader", &[]).is_some(),
        "the leader gauge is exported"
    );

    // Shutdown turns readiness off at once (the server stops accepting too, so ask the
    // checks directly).
    shutdown.trigger();
    let report = running.readiness.check().await;
    assert!(!report.ready);
    let check = report.check("shutdown").expect("shutdown check");
    assert!(!check.ok && check.detail == "shutting down", "{check:?}");
    tokio::time::timeout(Duration::from_secs(30), running.stopped())
        .await
        .expect("the service stops on shutdown")
        .expect("clean stop");
}

/// `bank serve` as a process of its own (so its `/metrics` count its work only), on a
/// free port, isolated by `id` (schema, topics, group) with the instance id `instance`.
fn serve_process(id: &str, instance: &str) -> Service {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    Service {
        port,
        envs: vec![
            (
                "DATABASE_URL",
                env_or(
                    "DATABASE_URL",
                    "postgres://postgres@127.0.0.1:5432/thalo_test",
                ),
            ),
            ("KAFKA_BROKERS", env_or("KAFKA_BROKERS", "127.0.0.1:9092")),
            ("BANK_SCHEMA", format!("bank_{id}")),
            ("BANK_LISTEN", format!("127.0.0.1:{port}")),
            ("BANK_TOPIC_PREFIX", format!("test-{id}-")),
            ("BANK_GROUP_PREFIX", format!("bank-{id}.")),
            ("BANK_INSTANCE_ID", format!("bank-test-{instance}")),
        ],
        log: std::env::temp_dir().join(format!("bank-metrics-{instance}.log")),
        child: None,
    }
}

/// The samples of `GET /metrics`.
async fn scrape(http: &reqwest::Client, base: &str) -> Samples {
    let res = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(res.status(), 200);
    samples(&res.text().await.expect("body"))
}

/// `/metrics` under load: a `bank serve` process takes 100 commands on five accounts
/// (stored, rejected, and some that conflict with writes from outside the service), and
/// every counter and histogram moves by what the load did, from a scrape before to a
/// scrape after; the outbox, relay and consumer gauges are exported with sane values,
/// and the relay leads. A second `bank serve` on the same database is ready with its
/// relay on standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_under_load() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut leader = serve_process(&id, &format!("{id}-a"));
    leader.spawn().await;
    let base = format!("http://127.0.0.1:{}", leader.port);
    let http = reqwest::Client::new();
    let ready = readiness_until(&http, &base, 200).await;
    let relay = ready.check("relay").expect("relay check");
    assert!(relay.detail.starts_with("leader"), "{ready:?}");
    let before = scrape(&http, &base).await;

    // The load: per account, one client sending its commands one after the other.
    const ACCOUNTS: usize = 5;
    const DEPOSITS: usize = 14;
    const WITHDRAWALS: usize = 4;
    let clients: Vec<_> = (0..ACCOUNTS)
        .map(|a| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                let account = format!("LOAD-{a}");
                let post = |path: String, body: serde_json::Value| {
                    let request = http.post(format!("{base}{path}")).json(&body);
                    async move {
                        let res = request.send().await.expect("command");
                        let status = res.status().as_u16();
                        (status, res.text().await.unwrap_or_default())
                    }
                };
                let opened = post(
                    "/accounts".to_owned(),
                    json!({"account_number": account, "owner": "Ada", "initial_deposit": 100_00}),
                )
                .await;
                assert_eq!(opened.0, 201, "{opened:?}");
                // Half of them overdraw: rejected, 422.
                for n in 0..WITHDRAWALS {
                    let amount = if n % 2 == 0 { 5_00 } else { 1_000_00 };
                    let path = format!("/accounts/{account}/withdraw");
                    let res = post(path, json!({ "amount": amount })).await;
                    let expected = if n % 2 == 0 { 200 } else { 422 };
                    assert_eq!(res.0, expected, "{res:?}");
                }
                // Deposits last: a rejected command takes the account out of the
                // service's cache, a stored one puts it back.
                for _ in 0..DEPOSITS {
                    let path = format!("/accounts/{account}/deposit");
                    let res = post(path, json!({"amount": 1_00})).await;
                    assert_eq!(res.0, 200, "{res:?}");
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("client");
    }
    // A deposit from outside the service on each account (as the CLI or another
    // instance would): the service's cached account is stale, so its next command
    // conflicts once and is decided again on the reloaded account.
    let pool = sqlx::PgPool::connect(&env_or(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/thalo_test",
    ))
    .await
    .expect("Postgres");
    let repo = thalo::Repository::new(store_in(&pool, &format!("bank_{id}")));
    for a in 0..ACCOUNTS {
        let account = format!("LOAD-{a}");
        repo.execute::<bank::BankAccount>(
            &account,
            bank::BankAccountCommand::Deposit { amount: 1_00 },
        )
        .await
        .expect("a deposit from outside the service");
        let res = http
            .post(format!("{base}/accounts/{account}/deposit"))
            .json(&json!({"amount": 1_00}))
            .send()
            .await
            .expect("deposit");
        assert_eq!(res.status(), 200);
    }
    let commands = ACCOUNTS * (1 + DEPOSITS + WITHDRAWALS + 1);
    let rejected = ACCOUNTS * WITHDRAWALS / 2;
    let stored = commands - rejected;
    // Every stored command stored one event; the outside deposits one more each.
    let events = stored + ACCOUNTS;
    assert_eq!(commands, 100);

    // Wait until the relay has published every event, the consumer applied them, and
    // the gauges (the outbox's measured every 5 s, the consumer's lag every second)
    // show the pipeline drained.
    let topic = format!("test-{id}-bank_account");
    let consumer = format!("bank-{id}.bank_balances");
    let delta = |after: &Samples, name: &str, labels: &[(&str, &str)]| {
        sample(after, name, labels).unwrap_or(0.0) - sample(&before, name, labels).unwrap_or(0.0)
    };
    // The consumer's lag of each partition of the topic (`None` before the first
    // statistics come).
    let lag = |samples: &Samples| -> Option<f64> {
        let lags: Vec<f64> = samples
            .iter()
            .filter(|((name, labels), _)| {
                name == "thalo_consumer_lag"
                    && labels.contains(&("consumer".to_owned(), consumer.clone()))
                    && labels.contains(&("topic".to_owned(), topic.clone()))
            })
            .map(|(_, value)| *value)
            .collect();
        (!lags.is_empty()).then(|| lags.iter().sum())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let after = scrape(&http, &base).await;
        let published = delta(&after, "thalo_relay_published_total", &[("topic", &topic)]);
        let applied = delta(
            &after,
            "thalo_consumer_handled_total",
            &[("consumer", &consumer), ("outcome", "applied")],
        );
        let depth = sample(&after, "thalo_outbox_depth", &[]);
        let consumer_lag = lag(&after);
        if published >= events as f64
            && applied >= events as f64
            && depth == Some(0.0)
            && consumer_lag == Some(0.0)
        {
            break after;
        }
        assert!(
            Instant::now() < deadline,
            "published {published}, applied {applied} of {events}; outbox depth {depth:?}, \
             consumer lag {consumer_lag:?}\n{}",
            std::fs::read_to_string(&leader.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The commands, by outcome, and their durations.
    let bank = [("aggregate_type", "bank_account")];
    let outcome =
        |outcome: &'static str| [("aggregate_type", "bank_account"), ("outcome", outcome)];
    assert_eq!(
        delta(&after, "thalo_commands_total", &outcome("stored")),
        stored as f64
    );
    assert_eq!(
        delta(&after, "thalo_commands_total", &outcome("rejected")),
        rejected as f64
    );
    for outcome_ in ["replayed", "conflict_exhausted", "error"] {
        assert_eq!(
            delta(&after, "thalo_commands_total", &outcome(outcome_)),
            0.0,
            "{outcome_}"
        );
    }
    assert_eq!(
        delta(&after, "thalo_command_duration_seconds_count", &bank),
        commands as f64
    );
    let timed = delta(
        &after,
        "thalo_command_duration_seconds_bucket",
        &[("aggregate_type", "bank_account"), ("le", "+Inf")],
    );
    assert_eq!(timed, commands as f64);
    let conflicts = delta(&after, "thalo_command_conflicts_total", &bank);
    assert!(conflicts >= ACCOUNTS as f64, "conflicts: {conflicts}");
    // The appends of the stored commands (the outside deposits were this test's own).
    assert!(delta(&after, "thalo_appends_total", &bank) >= stored as f64);
    assert_eq!(
        delta(&after, "thalo_append_events_total", &bank),
        stored as f64
    );
    // The relay and the consumer: every event, once, nothing failed.
    let published = delta(&after, "thalo_relay_published_total", &[("topic", &topic)]);
    assert!(published >= events as f64, "{published}");
    let handled = |outcome: &'static str| {
        delta(
            &after,
            "thalo_consumer_handled_total",
            &[("consumer", &consumer), ("outcome", outcome)],
        )
    };
    assert!(handled("applied") >= events as f64);
    for outcome in ["failed", "dead_lettered", "parked"] {
        assert_eq!(handled(outcome), 0.0, "{outcome}");
    }
    let calls = delta(
        &after,
        "thalo_consumer_handle_duration_seconds_count",
        &[("consumer", &consumer)],
    );
    assert!(calls >= 1.0, "handler calls: {calls}");
    // The gauges, present and sane: the outbox drained (its oldest row's age 0 when
    // none waits), no failure, nothing parked, the consumer caught up, this relay leads.
    assert_eq!(sample(&after, "thalo_outbox_depth", &[]), Some(0.0));
    let age = sample(&after, "thalo_outbox_oldest_age_seconds", &[]);
    assert!(age.is_some_and(|age| (0.0..60.0).contains(&age)), "{age:?}");
    assert_eq!(sample(&after, "thalo_relay_failed_total", &[]), Some(0.0));
    assert_eq!(
        sample(&after, "thalo_relay_parked_aggregates", &[]),
        Some(0.0)
    );
    assert_eq!(lag(&after), Some(0.0), "the consumer's lag, summed");
    assert_eq!(sample(&after, "thalo_relay_is_leader", &[]), Some(1.0));
    assert_eq!(
        sample(
            &after,
            "thalo_dead_letters_total",
            &[("consumer", &consumer)]
        ),
        Some(0.0)
    );

    // A second instance on the same database and topic: ready, its relay on standby
    // (the first holds the outbox), and its leader gauge says so.
    let mut standby = serve_process(&id, &format!("{id}-b"));
    standby.spawn().await;
    let standby_base = format!("http://127.0.0.1:{}", standby.port);
    let report = readiness_until(&http, &standby_base, 200).await;
    let relay = report.check("relay").expect("relay check");
    assert_eq!(relay.detail, "standby", "{report:?}");
    let metrics = scrape(&http, &standby_base).await;
    assert_eq!(sample(&metrics, "thalo_relay_is_leader", &[]), Some(0.0));
    let report = readiness_until(&http, &base, 200).await;
    let relay = report.check("relay").expect("relay check");
    assert!(relay.detail.starts_with("leader"), "{report:?}");
    assert_eq!(
        sample(&scrape(&http, &base).await, "thalo_relay_is_leader", &[]),
        Some(1.0)
    );

    standby.kill().await;
    leader.kill().await;
    let _ = sqlx::query(&format!("DROP SCHEMA \"bank_{id}\" CASCADE"))
        .execute(&pool)
        .await;
    let _ = std::fs::remove_file(&leader.log);
    let _ = std::fs::remove_file(&standby.log);
}

/// With the broker unreachable, `/readyz` is 503 and names the `kafka` check; Postgres
/// still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_names_an_unreachable_broker() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = ServiceConfig {
        kafka_brokers: "127.0.0.1:1".to_owned(),
        ..isolated(&id)
    };
    let shutdown = Shutdown::new();
    let running = start(config, shutdown.clone())
        .await
        .expect("the service starts without a broker (Postgres at DATABASE_URL is required)");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    let report = readiness_until(&http, &base, 503).await;
    let kafka = report.check("kafka").expect("kafka check");
    assert!(!kafka.ok, "{report:?}");
    assert!(kafka.detail.contains("127.0.0.1:1"), "{kafka:?}");
    assert!(report.check("postgres").expect("postgres").ok, "{report:?}");
    assert!(report.check("shutdown").expect("shutdown").ok, "{report:?}");
    // The consumer cannot join a group without a broker.
    assert!(
        !report.check("consumer").expect("consumer").ok,
        "{report:?}"
    );

    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(30), running.stopped())
        .await
        .expect("the service stops on shutdown without a broker")
        .expect("clean stop");
}
