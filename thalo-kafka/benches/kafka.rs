//! Relay and consumer throughput against raw rdkafka, and end-to-end latency.
//!
//! Needs Postgres (`DATABASE_URL`) and a Kafka-compatible broker (`KAFKA_BROKERS`); run
//! by hand, not in CI:
//!
//! ```text
//! cargo bench -p thalo-kafka --bench kafka
//! ```
//!
//! Prints a markdown table. Every figure is measured in the same run, on the same broker
//! and database, side by side with the raw client doing the same work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgConnection;
use thalo::{
    commands, events, Aggregate, Error, EventEnvelope, EventHandler, EventStore, Metadata, RawEvent,
};
use thalo_kafka::{encode_headers, KafkaConsumer, KafkaRelay, TopicNaming, TopicSettings};
use thalo_postgres::{PgEventStore, PgProjection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EVENTS: usize = 20_000;
const AGGREGATES: usize = 200;
const PARTITIONS: i32 = 6;
const LATENCY_RATE: u64 = 1_000;
const LATENCY_SECONDS: u64 = 10;
const RYW_WRITERS: u64 = 10;
const RYW_COMMANDS: u64 = 60;

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    balance: i64,
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

struct Balances {
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
        let AccountEvent::Deposited(e) = &envelope.event;
        sqlx::query(&format!(
            "INSERT INTO {}.balances AS b (account, balance) VALUES ($1, $2)
             ON CONFLICT (account) DO UPDATE SET balance = b.balance + EXCLUDED.balance",
            self.schema
        ))
        .bind(&envelope.aggregate_id)
        .bind(e.amount)
        .execute(tx)
        .await
        .map_err(|e| Error::store("updating balances", e))?;
        Ok(())
    }

    /// The same upsert for a whole batch: one statement, one row per account.
    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        envelopes: &[&EventEnvelope<AccountEvent>],
    ) -> Result<(), Error> {
        let mut sums: HashMap<&str, i64> = HashMap::new();
        for envelope in envelopes {
            let AccountEvent::Deposited(e) = &envelope.event;
            *sums.entry(envelope.aggregate_id.as_str()).or_default() += e.amount;
        }
        let mut sums: Vec<(&str, i64)> = sums.into_iter().collect();
        // A fixed order, so concurrent batches lock rows in the same order.
        sums.sort_unstable();
        let (accounts, amounts): (Vec<&str>, Vec<i64>) = sums.into_iter().unzip();
        sqlx::query(&format!(
            "INSERT INTO {}.balances AS b (account, balance)
             SELECT * FROM UNNEST($1::text[], $2::int8[])
             ON CONFLICT (account) DO UPDATE SET balance = b.balance + EXCLUDED.balance",
            self.schema
        ))
        .bind(&accounts)
        .bind(&amounts)
        .execute(tx)
        .await
        .map_err(|e| Error::store("updating balances", e))?;
        Ok(())
    }
}

/// Counts events, and records the arrival time of each (for latency).
#[derive(Clone, Default)]
struct Arrivals {
    seen: Arc<Mutex<HashMap<(String, u64), Instant>>>,
}

impl EventHandler<AccountEvent> for Arrivals {
    async fn handle(&self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), Error> {
        let now = Instant::now();
        self.seen
            .lock()
            .unwrap()
            .entry((envelope.aggregate_id.clone(), envelope.sequence))
            .or_insert(now);
        Ok(())
    }
}

fn name(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::new_v4().simple())
}

struct Row {
    what: &'static str,
    thalo: String,
    raw: String,
    ratio: String,
    limit: &'static str,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .init();
    }
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/thalo_test".into());
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await?;
    let schema = name("bench");
    let store = PgEventStore::builder(pool.clone())
        .schema(schema.clone())
        .build()?;
    store.migrate().await?;
    sqlx::query(&format!(
        "CREATE TABLE {schema}.balances (account TEXT PRIMARY KEY, balance BIGINT NOT NULL)"
    ))
    .execute(&pool)
    .await?;
    let prefix = format!("{}.", name("bench"));
    let naming = TopicNaming::prefixed(prefix.clone());
    let topic = naming.topic("account");
    let raw_topic = format!("{topic}.raw");
    let settings = TopicSettings::default().with_partitions(PARTITIONS);
    thalo_kafka::ensure_topics(&brokers, &[topic.clone(), raw_topic.clone()], &settings).await?;

    // Fill the outbox: AGGREGATES accounts, 50 events per append.
    let per = (EVENTS / AGGREGATES) as u64;
    let mut envelopes: Vec<EventEnvelope<RawEvent>> = Vec::with_capacity(EVENTS);
    for a in 0..AGGREGATES {
        let id = format!("acc-{a}");
        let mut version = 0;
        while version < per {
            let n = 50.min(per - version);
            let events = (0..n)
                .map(|i| {
                    AccountEvent::Deposited(DepositedEvent {
                        amount: (version + i) as i64,
                    })
                })
                .collect();
            let stored = store
                .append::<Account>(&id, version, events, &Metadata::default())
                .await?;
            for e in stored {
                envelopes.push(EventEnvelope {
                    id: e.id,
                    aggregate_type: e.aggregate_type,
                    aggregate_id: e.aggregate_id,
                    sequence: e.sequence,
                    position: e.position,
                    timestamp: e.timestamp,
                    metadata: e.metadata,
                    event: RawEvent::encode(&e.event)?,
                });
            }
            version += n;
        }
    }

    // 1a. Raw producer: the same messages, idempotent, acks=all, enqueue all, await all.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(EVENTS);
    for e in &envelopes {
        let record = FutureRecord::to(&raw_topic)
            .key(e.aggregate_id.as_str())
            .payload(e.event.payload.as_str())
            .headers(encode_headers(e))
            .timestamp(e.timestamp.timestamp_millis());
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    let raw_produce = EVENTS as f64 / started.elapsed().as_secs_f64();

    // 1b. Relay: from a filled outbox to every row acknowledged and deleted.
    let relay = KafkaRelay::from_store(&store, brokers.clone())
        .with_topic_naming(naming.clone())
        .with_topic_settings(settings.clone())
        .with_batch_size(2000);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let relay_task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    while relay.status().published < EVENTS as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let relay_cold = EVENTS as f64 / started.elapsed().as_secs_f64();

    // 1c. Relay again, warm (connected, topics known): put the outbox rows back, as if
    // the 20,000 events had just been stored, and time until they are all acked and
    // deleted. (They reach Kafka a second time; the consumers below read the topic's
    // first 20,000 messages.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    sqlx::query(&format!("INSERT INTO {schema}.outbox (position) SELECT position FROM {schema}.events ORDER BY position"))
        .execute(&pool)
        .await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(store.notify_channel())
        .execute(&pool)
        .await?;
    while relay.status().published < 2 * EVENTS as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let relay_rate = EVENTS as f64 / started.elapsed().as_secs_f64();

    // 2a. Raw consumer: read the relay's topic with a fresh group; timed from the first
    // message to the last (group join excluded on both sides).
    let raw_consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", name("raw"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    raw_consumer.subscribe(&[&topic])?;
    let mut first = None;
    let mut count = 0;
    let mut bytes = 0;
    while count < EVENTS {
        let m = raw_consumer.recv().await?;
        first.get_or_insert_with(Instant::now);
        bytes += m.payload_len();
        count += 1;
    }
    let raw_consume = EVENTS as f64 / first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    drop(raw_consumer);
    let _ = bytes;

    // 2b. Raw consumer + the projection's upsert per event in autocommit, no checkpoint,
    // no exactly-once (what a hand-written at-least-once consumer would do).
    sqlx::query(&format!(
        "CREATE TABLE {schema}.raw_balances (account TEXT PRIMARY KEY, balance BIGINT NOT NULL)"
    ))
    .execute(&pool)
    .await?;
    let upsert = format!(
        "INSERT INTO {schema}.raw_balances AS b (account, balance) VALUES ($1, $2)
         ON CONFLICT (account) DO UPDATE SET balance = b.balance + EXCLUDED.balance"
    );
    let raw_consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", name("raw_upsert"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    raw_consumer.subscribe(&[&topic])?;
    let mut first = None;
    for _ in 0..EVENTS {
        let m = raw_consumer.recv().await?;
        first.get_or_insert_with(Instant::now);
        let key =
            String::from_utf8_lossy(rdkafka::Message::key(&m).unwrap_or_default()).into_owned();
        sqlx::query(&upsert)
            .bind(key)
            .bind(1_i64)
            .execute(&pool)
            .await?;
    }
    let raw_upsert = EVENTS as f64 / first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    drop(raw_consumer);

    // 2c. Projection consumer: the same topic into Postgres, exactly once.
    let stop_consumer = CancellationToken::new();
    let consumer_task = tokio::spawn(
        KafkaConsumer::for_projection(brokers.clone())
            .with_group_prefix(format!("{}.", name("bench")))
            .with_topic(topic.clone())
            .with_topic_settings(settings.clone())
            .run_projection(
                store.clone(),
                Balances {
                    schema: schema.clone(),
                },
                stop_consumer.clone(),
            ),
    );
    let count_sql =
        format!("SELECT count(*) FROM {schema}.stream_checkpoints WHERE projection = 'balances'");
    let sum_sql = format!("SELECT coalesce(sum(sequence), 0)::bigint FROM {schema}.stream_checkpoints WHERE projection = 'balances'");
    let mut first = None;
    loop {
        let applied: i64 = sqlx::query_scalar(&sum_sql).fetch_one(&pool).await?;
        if applied > 0 {
            first.get_or_insert_with(Instant::now);
        }
        if applied >= EVENTS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _: i64 = sqlx::query_scalar(&count_sql).fetch_one(&pool).await?;
    let projection_rate = EVENTS as f64 / first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    stop_consumer.cancel();
    consumer_task.await??;

    // 3. Latency: append at a steady rate; commit -> relay -> broker -> consumer handler.
    let arrivals = Arrivals::default();
    let stop_latency = CancellationToken::new();
    let latency_consumer = tokio::spawn(
        KafkaConsumer::new(brokers.clone(), name("latency"))
            .with_topic(topic.clone())
            .set("auto.offset.reset", "latest")
            .set("fetch.wait.max.ms", "5")
            .run(arrivals.clone(), stop_latency.clone()),
    );
    // Let the consumer join before measuring.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let committed: Arc<Mutex<HashMap<(String, u64), Instant>>> = Arc::default();
    let writers = 20;
    let total = (LATENCY_RATE * LATENCY_SECONDS) as usize;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, committed, sent) = (store.clone(), committed.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 * writers / LATENCY_RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let ids: Vec<String> = (0..5).map(|i| format!("lat-{w}-{i}")).collect();
            let mut versions = vec![0_u64; ids.len()];
            for n in 0..(total as u64 / writers) {
                tick.tick().await;
                let k = (n as usize) % ids.len();
                let stored = store
                    .append::<Account>(
                        &ids[k],
                        versions[k],
                        vec![AccountEvent::Deposited(DepositedEvent { amount: 1 })],
                        &Metadata::default(),
                    )
                    .await
                    .expect("append");
                let now = Instant::now();
                versions[k] += 1;
                committed
                    .lock()
                    .unwrap()
                    .insert((ids[k].clone(), stored[0].sequence), now);
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let write_started = Instant::now();
    for t in tasks {
        t.await?;
    }
    let write_elapsed = write_started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.seen.lock().unwrap().len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_latency.cancel();
    latency_consumer.await??;
    let mut latencies: Vec<f64> = {
        let seen = arrivals.seen.lock().unwrap();
        let committed = committed.lock().unwrap();
        committed
            .iter()
            .filter_map(|(k, t)| {
                seen.get(k)
                    .map(|s| s.saturating_duration_since(*t).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let achieved_rate = sent.load(Ordering::Relaxed) as f64 / write_elapsed.as_secs_f64();

    // 4. Read-your-writes: append, then wait until the Kafka-fed projection shows it
    // (`wait_until_projected`, by its checkpoints): what a `Consistency: projected`
    // request pays on top of its command.
    let stop_projected = CancellationToken::new();
    let projected_consumer = tokio::spawn(
        KafkaConsumer::for_projection(brokers.clone())
            .with_group_prefix(format!("{}.", name("ryw")))
            .with_topic(topic.clone())
            .with_topic_settings(settings.clone())
            .set("auto.offset.reset", "latest")
            .set("fetch.wait.max.ms", "5")
            .run_projection(
                store.clone(),
                Balances {
                    schema: schema.clone(),
                },
                stop_projected.clone(),
            ),
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    let projection = Balances {
        schema: schema.clone(),
    };
    let waits: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..RYW_WRITERS {
        let (store, waits) = (store.clone(), waits.clone());
        let projection = Balances {
            schema: projection.schema.clone(),
        };
        tasks.push(tokio::spawn(async move {
            let id = format!("ryw-{w}");
            for version in 0..RYW_COMMANDS {
                let stored = store
                    .append::<Account>(
                        &id,
                        version,
                        vec![AccountEvent::Deposited(DepositedEvent { amount: 1 })],
                        &Metadata::default(),
                    )
                    .await
                    .expect("append");
                let committed = Instant::now();
                store
                    .wait_until_projected(&projection, &stored, Duration::from_secs(10))
                    .await
                    .expect("projected");
                waits
                    .lock()
                    .unwrap()
                    .push(committed.elapsed().as_secs_f64() * 1000.0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    stop_projected.cancel();
    projected_consumer.await??;
    let mut waits = std::mem::take(&mut *waits.lock().unwrap());
    waits.sort_by(|a, b| a.total_cmp(b));
    let wait_pct = |p: f64| {
        waits
            .get(((waits.len() as f64 * p) as usize).min(waits.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };

    stop.cancel();
    relay_task.await??;

    let rows = [
        Row {
            what: "outbox -> Kafka, cold start, events/s",
            thalo: format!("{relay_cold:.0}"),
            raw: format!("{raw_produce:.0}"),
            ratio: format!("{:.0}%", 100.0 * relay_cold / raw_produce),
            limit: "as below, plus connecting, InitProducerId, the lock and a topic check",
        },
        Row {
            what: "outbox -> Kafka (acked and deleted), warm, events/s",
            thalo: format!("{relay_rate:.0}"),
            raw: format!("{raw_produce:.0} (FutureProducer, same messages)"),
            ratio: format!("{:.0}%", 100.0 * relay_rate / raw_produce),
            limit: "broker append rate; relay adds a SELECT and a DELETE per batch of 2000",
        },
        Row {
            what: "Kafka -> Postgres projection, events/s",
            thalo: format!("{projection_rate:.0}"),
            raw: format!("{raw_consume:.0} (StreamConsumer, no processing)"),
            ratio: format!("{:.0}%", 100.0 * projection_rate / raw_consume),
            limit: "one transaction per partition batch: lock the stream checkpoints, one multi-row upsert (`handle_batch`), save the checkpoints, commit",
        },
        Row {
            what: "Kafka -> same upsert per event, hand-written, events/s",
            thalo: format!("{projection_rate:.0} (exactly once)"),
            raw: format!("{raw_upsert:.0} (StreamConsumer + autocommit upsert, at least once)"),
            ratio: format!("{:.0}%", 100.0 * projection_rate / raw_upsert),
            limit: "the hand-written loop pays a round trip and a commit per event; the projection one transaction per partition batch",
        },
        Row {
            what: "commit -> consumer handler latency, ms",
            thalo: format!(
                "p50 {:.1}, p99 {:.1}, max {:.1}",
                pct(0.50),
                pct(0.99),
                latencies.last().copied().unwrap_or(f64::NAN)
            ),
            raw: format!("{} events at {achieved_rate:.0}/s", latencies.len()),
            ratio: "-".into(),
            limit: "one batch in flight: an event waits for the batch before it to be acked, then its own ack (acks=all) and the consumer fetch",
        },
        Row {
            what: "commit -> wait_until_projected returns (Kafka-fed projection), ms",
            thalo: format!(
                "p50 {:.1}, p99 {:.1}, max {:.1}",
                wait_pct(0.50),
                wait_pct(0.99),
                waits.last().copied().unwrap_or(f64::NAN)
            ),
            raw: format!(
                "{} commands, {RYW_WRITERS} writers; commit -> handler p50 {:.1} (row above)",
                waits.len(),
                pct(0.50)
            ),
            ratio: format!("{:.2}x p50", wait_pct(0.50) / pct(0.50)),
            limit: "the pipeline above, plus the projection's transaction, plus the wait's polling of the checkpoints (2 ms doubling to its cap)",
        },
    ];
    println!("| measurement | thalo-kafka | raw rdkafka | ratio | what limits it |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.thalo, r.raw, r.ratio, r.limit
        );
    }

    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await?;
    Ok(())
}
