//! Shared helpers: services, random names, a test aggregate and a Postgres projection.
//!
//! Every test gets its own Postgres schema, its own topic prefix and its own consumer
//! groups, so tests run in parallel without seeing each other. A missing Postgres or
//! Kafka broker is a test failure, never a skip.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Once;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool, Row};
use thalo::{commands, events, Aggregate, AggregateType as _, Error, EventEnvelope};
use thalo_kafka::{KafkaConsumer, KafkaRelay, TopicNaming, TopicSettings};
use thalo_postgres::{PgEventStore, PgProjection};
use tokio::process::{Child, Command};
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/thalo_test".to_owned())
}

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,thalo_kafka=info".into()),
            )
            .with_test_writer()
            .try_init();
    });
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

/// A Postgres event store in a new random schema, migrated, plus a cleanup handle.
pub struct TestDb {
    pub store: PgEventStore,
    pub pool: PgPool,
    pub schema: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        init_tracing();
        let url = database_url();
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "Postgres is not reachable at DATABASE_URL={url}: {e}. Start it (scripts/test.sh \
                     does) or point DATABASE_URL at one. These tests never skip."
                )
            });
        let schema = random_name("tk");
        let store = PgEventStore::builder(pool.clone())
            .schema(schema.clone())
            .build()
            .expect("valid schema");
        store.migrate().await.expect("migrate");
        sqlx::query(&format!(
            "CREATE TABLE {schema}.balances (
                account TEXT PRIMARY KEY,
                balance BIGINT NOT NULL,
                events BIGINT NOT NULL,
                last_sequence BIGINT NOT NULL,
                out_of_order BIGINT NOT NULL
            )"
        ))
        .execute(&pool)
        .await
        .expect("create balances");
        TestDb {
            store,
            pool,
            schema,
        }
    }

    pub fn relay(&self, naming: &TopicNaming) -> KafkaRelay {
        KafkaRelay::from_store(&self.store, brokers())
            .with_topic_naming(naming.clone())
            .with_topic_settings(topic_settings())
            .with_poll_interval(Duration::from_millis(200))
            .with_lock_retry_interval(Duration::from_millis(200))
            .with_retry(
                thalo_kafka::RetryPolicy::new(u32::MAX)
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(Duration::from_secs(1)),
            )
    }

    pub fn projection(&self) -> Balances {
        Balances {
            schema: self.schema.clone(),
        }
    }

    /// The projection's rows: account -> (balance, events, last sequence, out of order).
    pub async fn balances(&self) -> HashMap<String, (i64, i64, i64, i64)> {
        sqlx::query(&format!(
            "SELECT account, balance, events, last_sequence, out_of_order FROM {}.balances",
            self.schema
        ))
        .fetch_all(&self.pool)
        .await
        .expect("read balances")
        .into_iter()
        .map(|r| {
            (
                r.get::<String, _>(0),
                (r.get(1), r.get(2), r.get(3), r.get(4)),
            )
        })
        .collect()
    }

    /// Waits until the test projection ([`Balances`], checkpoint key `balances`) has
    /// applied every `Account` event stored so far, by its per-stream checkpoints:
    /// read-your-writes for a settle phase, whichever consumer (or consumers, one after
    /// the other) feeds it. Panics with the error after `timeout`.
    pub async fn wait_until_projected(&self, timeout: Duration) {
        if let Err(err) = self
            .store
            .wait_until_caught_up(&self.projection(), &[Account::TYPE], timeout)
            .await
        {
            panic!("the projection did not apply the stored events: {err}");
        }
    }

    pub async fn outbox_len(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}.outbox", self.schema))
            .fetch_one(&self.pool)
            .await
            .expect("count outbox")
    }

    pub async fn drop_schema(self) {
        let _ = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .execute(&self.pool)
            .await;
        self.pool.close().await;
    }
}

pub fn topic_settings() -> TopicSettings {
    TopicSettings::default().with_partitions(3)
}

/// A random topic prefix per test, shared by relay and consumers.
pub fn naming() -> (TopicNaming, String) {
    let prefix = format!("{}.", random_name("t"));
    let topic = format!("{prefix}account");
    (TopicNaming::prefixed(prefix), topic)
}

pub fn consumer(naming: &TopicNaming) -> KafkaConsumer {
    consumer_in_group(naming, &random_name("group"))
}

pub fn consumer_in_group(naming: &TopicNaming, group: &str) -> KafkaConsumer {
    configured(KafkaConsumer::new(brokers(), group), naming)
}

/// A consumer for a projection, in a group of its own: the projection's group is
/// `<random prefix>.<checkpoint key>`.
pub fn projection_consumer(naming: &TopicNaming) -> KafkaConsumer {
    projection_consumer_with_prefix(naming, &random_name("group"))
}

/// A consumer for a projection whose group is `<prefix>.<checkpoint key>`: the same
/// prefix and projection give the same group (a restarted member).
pub fn projection_consumer_with_prefix(naming: &TopicNaming, prefix: &str) -> KafkaConsumer {
    configured(KafkaConsumer::for_projection(brokers()), naming)
        .with_group_prefix(format!("{prefix}."))
}

fn configured(consumer: KafkaConsumer, naming: &TopicNaming) -> KafkaConsumer {
    consumer
        .with_topic_naming(naming.clone())
        .with_topic_settings(topic_settings())
        .subscribe::<Account>()
        .with_retry(
            thalo_kafka::RetryPolicy::new(3)
                .with_initial_backoff(Duration::from_millis(20))
                .with_max_backoff(Duration::from_millis(200)),
        )
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
}

// ---------------------------------------------------------------------------------
// The test aggregate.

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    pub balance: i64,
}

#[commands]
impl Account {
    pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> {
        if amount <= 0 {
            return Err(Error::invariant_code("NON_POSITIVE_AMOUNT"));
        }
        Ok(DepositedEvent { amount })
    }

    pub fn withdraw(&self, amount: i64) -> Result<WithdrewEvent, Error> {
        if amount > self.balance {
            return Err(Error::invariant_code("INSUFFICIENT_FUNDS"));
        }
        Ok(WithdrewEvent { amount })
    }
}

#[events]
impl Account {
    pub fn deposited(&mut self, amount: i64) {
        self.balance += amount;
    }

    pub fn withdrew(&mut self, amount: i64) {
        self.balance -= amount;
    }
}

/// Balance per account, and a record of whether events arrived in sequence order.
#[derive(Clone, Debug)]
pub struct Balances {
    schema: String,
}

impl PgProjection<AccountEvent> for Balances {
    fn name(&self) -> &str {
        "balances"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<AccountEvent>,
    ) -> Result<(), Error> {
        let delta = match &envelope.event {
            AccountEvent::Deposited(e) => e.amount,
            AccountEvent::Withdrew(e) => -e.amount,
        };
        let sequence = i64::try_from(envelope.sequence).expect("sequence fits");
        sqlx::query(&format!(
            "INSERT INTO {schema}.balances AS b (account, balance, events, last_sequence, out_of_order)
             VALUES ($1, $2, 1, $3, CASE WHEN $3 = 1 THEN 0 ELSE 1 END)
             ON CONFLICT (account) DO UPDATE SET
                balance = b.balance + EXCLUDED.balance,
                events = b.events + 1,
                last_sequence = EXCLUDED.last_sequence,
                out_of_order = b.out_of_order + CASE WHEN EXCLUDED.last_sequence = b.last_sequence + 1 THEN 0 ELSE 1 END",
            schema = self.schema
        ))
        .bind(&envelope.aggregate_id)
        .bind(delta)
        .bind(sequence)
        .execute(tx)
        .await
        .map_err(|e| Error::store("updating balances", e))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Raw Kafka access.

/// Reads messages of `topic` from the beginning with a fresh group until `count` have
/// arrived or `timeout` passed, then goes on until none arrives for a second (to pick
/// up duplicates too).
pub async fn read_topic(topic: &str, count: usize, timeout: Duration) -> Vec<OwnedMessage> {
    // A group subscribed to a topic that does not exist yet gets no partitions until its
    // next metadata refresh (minutes), even once the relay has created it: create it
    // first, as the relay would (an existing topic is success).
    thalo_kafka::ensure_topics(&brokers(), &[topic.to_owned()], &topic_settings())
        .await
        .expect("create the topic to read");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", random_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut messages = Vec::new();
    let deadline = Instant::now() + timeout;
    loop {
        let left = if messages.len() < count {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::from_secs(1)
        };
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => messages.push(m.detach()),
            Ok(Err(_)) => {}
            Err(_) => break,
        }
    }
    messages
}

pub fn header(message: &OwnedMessage, key: &str) -> Option<String> {
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer")
}

/// Produces a raw message (for poison-message tests).
pub async fn produce_raw(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
    headers: rdkafka::message::OwnedHeaders,
) {
    producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

/// Waits until `check` is true, polling; panics with `what` after `timeout`.
///
/// For what has no wait of its own: the relay draining the outbox or taking the lead, a
/// plain handler's in-memory record, a consumer's counters, parking state. Not for a
/// Postgres projection's rows: wait on its checkpoints instead
/// ([`TestDb::wait_until_projected`], `PgEventStore::wait_until_projected`), then read
/// once.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------
// A broker process of our own (for the broker-restart test).

/// A tansu broker on a random free port with SQLite storage, so data survives restarts.
pub struct OwnBroker {
    pub port: u16,
    /// Working directory: the SQLite database and the broker's log.
    pub dir: PathBuf,
    child: Option<Child>,
}

pub fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU_BIN") {
        return path.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = PathBuf::from(home).join(".cargo/bin/tansu");
    if cargo_bin.exists() {
        return cargo_bin;
    }
    PathBuf::from("tansu")
}

impl OwnBroker {
    pub async fn start() -> OwnBroker {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let dir = std::env::temp_dir().join(random_name("tansu"));
        std::fs::create_dir_all(&dir).expect("broker directory");
        let mut broker = OwnBroker {
            port,
            dir,
            child: None,
        };
        broker.spawn().await;
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let binary = tansu_binary();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .expect("broker log");
        // tansu resolves the SQLite path against its working directory.
        let child = Command::new(&binary)
            .current_dir(&self.dir)
            .arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            .arg("--storage-engine")
            .arg("sqlite://broker.db")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the tansu broker `{}` (install it with `cargo install tansu \
                     --version 0.6.0 --features dynostore,libsql`, or set TANSU_BIN): {e}",
                    binary.display()
                )
            });
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
                panic!("the tansu broker did not start on {addr}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused broker (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .expect("the broker runs");
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Kills the broker process (like a crash) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
