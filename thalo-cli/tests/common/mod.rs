//! Shared helpers: a migrated store in a fresh schema per test, the `thalo` binary run
//! against it, Kafka access, and a small aggregate.
//!
//! Tests need a real Postgres at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/thalo_test`) and, for the Kafka tests, a
//! Kafka-compatible broker at `KAFKA_BROKERS` (default `127.0.0.1:9092`). A missing
//! service fails the test with a message naming the variable: these tests never skip.

#![allow(dead_code, unreachable_pub)]

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use thalo::{commands, events, Aggregate, AggregateType, Error, EventEnvelope, EventStore};
use thalo_kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use thalo_kafka::rdkafka::message::{Header, Headers, OwnedHeaders};
use thalo_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use thalo_kafka::rdkafka::Message;
use thalo_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use thalo_kafka::TopicSettings;
use thalo_postgres::{OutboxEntry, PgEventStore, PgProjection};
use uuid::Uuid;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/thalo_test";

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A fresh name: `<prefix>_<random>`.
pub fn random_name(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::new_v4().simple())
}

/// Fails the test (never skips it) when the broker is not reachable.
pub async fn require_kafka() -> String {
    let brokers = brokers();
    let first = brokers.split(',').next().unwrap_or_default().to_owned();
    let reachable = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(first.clone()),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(
        reachable,
        "no Kafka-compatible broker at KAFKA_BROKERS={brokers}. Start one (scripts/test.sh \
         does: `tansu broker --listener-url tcp://{first} --advertised-listener-url \
         tcp://{first} --storage-engine memory://tansu/`) or point KAFKA_BROKERS at one. \
         These tests never skip."
    );
    brokers
}

/// Drops its schema when the last handle goes away, unless the test panicked (then the
/// schema is kept for inspection and its name printed).
#[derive(Debug)]
pub struct SchemaGuard {
    pub schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping schema {} of a failed test", self.schema);
            return;
        }
        let statement = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        // Drop runs inside the test's runtime, which cannot block on a future: use a
        // thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&database_url()).await {
                    let _ = conn.execute("SET lock_timeout = '5s'").await;
                    let _ = conn.execute(statement.as_str()).await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

pub async fn pool() -> PgPool {
    let url = database_url();
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at DATABASE_URL={url}: {e}. Start it \
                 (scripts/test.sh does) or point DATABASE_URL at a server; these tests never \
                 skip."
            )
        })
}

/// A store in a fresh schema (migrated unless `TestDb::empty`).
#[derive(Debug, Clone)]
pub struct TestDb {
    pub store: PgEventStore,
    pub pool: PgPool,
    pub schema: String,
    pub guard: Arc<SchemaGuard>,
}

impl TestDb {
    /// A migrated store.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        db.store.migrate().await.expect("migrate");
        db
    }

    /// A schema name with nothing in it yet.
    pub async fn empty() -> TestDb {
        let pool = pool().await;
        let schema = random_name("cli");
        let guard = Arc::new(SchemaGuard {
            schema: schema.clone(),
        });
        let store = PgEventStore::builder(pool.clone())
            .schema(&schema)
            .build()
            .expect("valid schema");
        TestDb {
            store,
            pool,
            schema,
            guard,
        }
    }

    /// `schema.table`, quoted, for SQL written by the tests.
    pub fn table(&self, table: &str) -> String {
        format!("\"{}\".{table}", self.schema)
    }

    /// `thalo --database-url ... --schema ... <args>`, with no other configuration from
    /// the test's environment.
    pub fn thalo(&self, args: &[&str]) -> Run {
        let url = database_url();
        let mut full = vec!["--database-url", url.as_str(), "--schema", &self.schema];
        full.extend_from_slice(args);
        thalo(&full)
    }

    /// Appends deposits of 1, 2, ... `count` to `id`, after `version` events.
    pub async fn deposit(
        &self,
        id: &str,
        version: u64,
        count: i64,
    ) -> Vec<EventEnvelope<AccountEvent>> {
        self.store
            .append::<Account>(
                &id.to_owned(),
                version,
                (1..=count)
                    .map(|amount| DepositedEvent { amount }.into())
                    .collect(),
                &thalo::Metadata::default(),
            )
            .await
            .expect("append deposits")
    }

    /// The outbox rows' positions, in outbox order.
    pub async fn outbox_positions(&self) -> Vec<i64> {
        sqlx::query_scalar(&format!(
            "SELECT position FROM {} ORDER BY id",
            self.table("outbox")
        ))
        .fetch_all(&self.pool)
        .await
        .expect("read the outbox")
    }

    pub async fn count(&self, table: &str, condition: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE {condition}",
            self.table(table)
        ))
        .fetch_one(&self.pool)
        .await
        .expect("count rows")
    }

    /// The `parking_log` rows: consumer, aggregate id, action, sequence, detail.
    pub async fn parking_log(&self) -> Vec<(Option<String>, String, String, Option<i64>, String)> {
        sqlx::query_as(&format!(
            "SELECT consumer, aggregate_id, action, sequence, detail FROM {} ORDER BY id",
            self.table("parking_log")
        ))
        .fetch_all(&self.pool)
        .await
        .expect("read parking_log")
    }
}

/// The finished `thalo` process.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(output: Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Asserts exit status 0 and returns standard output.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "thalo failed: {self:#?}");
        &self.stdout
    }

    /// Asserts exit status 0 and parses standard output as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        let stdout = self.ok();
        serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    }

    /// Asserts exit status `code` and one `error: ...` line on standard error; returns it.
    #[track_caller]
    pub fn fails(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "unexpected exit status: {self:#?}");
        assert!(
            self.stderr.starts_with("error: ") || self.stderr.starts_with("error:"),
            "no error line: {self:#?}"
        );
        &self.stderr
    }
}

/// Runs the `thalo` binary with `args` and a clean environment (no `DATABASE_URL`,
/// `KAFKA_BROKERS`, `THALO_*`), so each test says everything it uses.
pub fn thalo(args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_thalo"));
    command.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    let output = command.args(args).output().expect("run thalo");
    Run::from_output(output)
}

// ---------------------------------------------------------------------------------
// Outbox leadership and projections.

/// The outbox entry of `id`'s event `sequence` among `entries`.
pub fn entry<'a>(entries: &'a [OutboxEntry], id: &str, sequence: u64) -> &'a OutboxEntry {
    entries
        .iter()
        .find(|e| e.envelope.aggregate_id == id && e.envelope.sequence == sequence)
        .unwrap_or_else(|| panic!("no outbox entry for {id} #{sequence}"))
}

/// A projection that applies nothing but keeps its checkpoints (for lag tests).
#[derive(Debug)]
pub struct Noop {
    pub name: String,
}

impl PgProjection<AccountEvent> for Noop {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(
        &self,
        _tx: &mut PgConnection,
        _envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        Ok(())
    }
}

pub const ACCOUNT: &str = <Account as AggregateType>::TYPE;

// ---------------------------------------------------------------------------------
// Kafka.

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer")
}

/// Creates `topic` with `partitions` partitions.
pub async fn create_topic(topic: &str, partitions: i32) {
    thalo_kafka::ensure_topics(
        &brokers(),
        &[topic.to_owned()],
        &TopicSettings::default().with_partitions(partitions),
    )
    .await
    .expect("create topic");
}

/// Produces a message to partition 0 of `topic` with string headers.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
    headers: &[(&str, &str)],
) -> i64 {
    let mut owned = OwnedHeaders::new();
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: Some(*value),
        });
    }
    let delivery = producer
        .send(
            FutureRecord::to(topic)
                .partition(0)
                .key(key)
                .payload(payload)
                .headers(owned),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    delivery.offset
}

/// Waits until `check` is true, polling; panics with `what` after `timeout`. For what has
/// no wait of its own (the relay draining the outbox); not for a projection's rows: wait
/// on its checkpoints (`PgEventStore::wait_until_projected`), then read once.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `thalo_sequence` headers of the first `count` messages of partition 0 of
/// `topic`, read with a plain assigned consumer.
pub async fn sequences(topic: &str, count: usize) -> Vec<u64> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", random_name("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .expect("offset");
        consumer.assign(&tpl).expect("assign");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        while out.len() < count && std::time::Instant::now() < deadline {
            if let Some(message) = consumer.poll(Duration::from_millis(500)) {
                let message = message.expect("message");
                let sequence = message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "thalo_sequence"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).parse::<u64>().expect("a number"))
                    .expect("a sequence header");
                out.push(sequence);
            }
        }
        out
    })
    .await
    .expect("reader")
}

/// Commits `offset` on partition 0 of `topic` for `group`, without joining it.
pub fn commit(group: &str, topic: &str, offset: i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .expect("offset");
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// The committed offset of partition 0 of `topic` for `group`.
pub fn committed(group: &str, topic: &str) -> Offset {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .find_partition(topic, 0)
        .map(|e| e.offset())
        .expect("partition")
}

// ---------------------------------------------------------------------------------
// The test aggregate.

#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "cli_test_account")]
pub struct Account {
    #[identity]
    pub id: String,
    pub balance: i64,
}

#[commands]
impl Account {
    pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> {
        Ok(DepositedEvent { amount })
    }
}

#[events]
impl Account {
    pub fn deposited(&mut self, amount: i64) {
        self.balance += amount;
    }
}
