//! Rebuild throughput: a new version of a projection built from 100,000 stored events,
//! against hand-written sqlx doing the same reads and writes (the physical limit) and a
//! single set-based statement (what no event-by-event rebuild can beat).
//!
//! Run by hand against a local Postgres (not in CI):
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/thalo_test cargo bench -p thalo-postgres --bench rebuild
//! ```
//!
//! `BENCH_EVENTS` (default 100000) and `BENCH_ROUNDS` (default 3) change the size and the
//! number of measured rounds; the variants run interleaved, the table shows medians.

#![allow(missing_docs, clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool, Row};
use thalo::{
    commands, events, Aggregate, AggregateType, Error, EventEnvelope, EventStore, Metadata,
};
use thalo_postgres::{PgEventStore, PgProjection, PgSubscription, ReadModelTable};
use uuid::Uuid;

#[derive(Aggregate, Clone, Debug, Default, Serialize, Deserialize)]
#[aggregate(name = "rebuild_counter")]
pub struct Counter {
    #[identity]
    id: String,
    value: i64,
}

#[commands]
impl Counter {
    pub fn add(&self, by: i64) -> Result<AddedEvent, Error> {
        Ok(AddedEvent { by })
    }
}

#[events]
impl Counter {
    pub fn added(&mut self, by: i64) {
        self.value += by;
    }
}

const STREAMS: usize = 1_000;
const BATCH: usize = 1_000;

/// Totals per counter: one upsert per batch (`handle_batch`), or one per event.
struct Totals {
    table: ReadModelTable,
    per_event: bool,
}

impl Totals {
    async fn create(pool: &PgPool, table: &ReadModelTable) {
        sqlx::query(&format!(
            "CREATE TABLE {} (id TEXT PRIMARY KEY, total BIGINT NOT NULL, events BIGINT NOT NULL)",
            table.table()
        ))
        .execute(pool)
        .await
        .expect("create table");
    }
}

impl PgProjection<CounterEvent> for Totals {
    fn name(&self) -> &str {
        "totals"
    }

    fn version(&self) -> u32 {
        self.table.version()
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<CounterEvent>,
    ) -> Result<(), Error> {
        let CounterEvent::Added(added) = &envelope.event;
        sqlx::query(&format!(
            "INSERT INTO {} AS t (id, total, events) VALUES ($1, $2, 1)
             ON CONFLICT (id) DO UPDATE SET total = t.total + EXCLUDED.total, events = t.events + 1",
            self.table.table()
        ))
        .bind(&envelope.aggregate_id)
        .bind(added.by)
        .execute(tx)
        .await
        .map_err(|e| Error::store("upserting a total", e))?;
        Ok(())
    }

    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        envelopes: &[&EventEnvelope<CounterEvent>],
    ) -> Result<(), Error> {
        if self.per_event {
            for envelope in envelopes {
                self.handle(&mut *tx, envelope).await?;
            }
            return Ok(());
        }
        let mut sums: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for envelope in envelopes {
            let CounterEvent::Added(added) = &envelope.event;
            let entry = sums.entry(envelope.aggregate_id.as_str()).or_default();
            entry.0 += added.by;
            entry.1 += 1;
        }
        upsert(tx, self.table.table(), sums).await
    }
}

async fn upsert(
    tx: &mut PgConnection,
    table: &str,
    sums: BTreeMap<&str, (i64, i64)>,
) -> Result<(), Error> {
    let mut ids = Vec::with_capacity(sums.len());
    let mut totals = Vec::with_capacity(sums.len());
    let mut counts = Vec::with_capacity(sums.len());
    for (id, (total, count)) in sums {
        ids.push(id);
        totals.push(total);
        counts.push(count);
    }
    sqlx::query(&format!(
        "INSERT INTO {table} AS t (id, total, events)
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[])
         ON CONFLICT (id) DO UPDATE SET total = t.total + EXCLUDED.total, events = t.events + EXCLUDED.events"
    ))
    .bind(&ids)
    .bind(&totals)
    .bind(&counts)
    .execute(tx)
    .await
    .map_err(|e| Error::store("upserting totals", e))?;
    Ok(())
}

/// Hand-written: read the log in pages of `BATCH` in position order, decode the JSON,
/// upsert the page's sums and save the position, one transaction per page (what a
/// rebuild has to do, without Thalo).
async fn raw_rebuild(pool: &PgPool, schema: &str, table: &str) {
    let mut after = 0i64;
    loop {
        let mut tx = pool.begin().await.expect("begin");
        let rows = sqlx::query(&format!(
            "SELECT position, aggregate_id, payload FROM \"{schema}\".events
             WHERE position > $1 ORDER BY position LIMIT {BATCH}"
        ))
        .bind(after)
        .fetch_all(&mut *tx)
        .await
        .expect("read");
        let Some(last) = rows.last() else {
            return;
        };
        after = last.get(0);
        let decoded: Vec<(String, i64)> = rows
            .iter()
            .map(|row| {
                let payload: serde_json::Value = row.get(2);
                (row.get(1), payload["by"].as_i64().expect("by"))
            })
            .collect();
        let mut sums: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for (id, by) in &decoded {
            let entry = sums.entry(id.as_str()).or_default();
            entry.0 += by;
            entry.1 += 1;
        }
        upsert(&mut tx, table, sums).await.expect("upsert");
        sqlx::query(&format!(
            "INSERT INTO \"{schema}\".checkpoints (name, position) VALUES ('raw', $1)
             ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position"
        ))
        .bind(after)
        .execute(&mut *tx)
        .await
        .expect("checkpoint");
        tx.commit().await.expect("commit");
        if rows.len() < BATCH {
            return;
        }
    }
}

/// One set-based statement: the floor for any rebuild that looks at every event.
async fn set_based(pool: &PgPool, schema: &str, table: &str) {
    sqlx::query(&format!(
        "INSERT INTO {table} (id, total, events)
         SELECT aggregate_id, sum((payload->>'by')::int8), count(*)
         FROM \"{schema}\".events WHERE aggregate_type = $1 GROUP BY aggregate_id"
    ))
    .bind(Counter::TYPE)
    .execute(pool)
    .await
    .expect("insert select");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/thalo_test".to_owned());
    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("connect to DATABASE_URL");
    let schema = format!("bench_rebuild_{}", Uuid::new_v4().simple());
    let store = PgEventStore::builder(pool.clone())
        .schema(&schema)
        .build()
        .expect("store");
    store.migrate().await.expect("migrate");

    // The history: `events` events over 1,000 counters, appended 100 at a time.
    let per_stream = events / STREAMS;
    let started = Instant::now();
    for stream in 0..STREAMS {
        let id = format!("counter-{stream}");
        let batch: Vec<CounterEvent> = (0..per_stream)
            .map(|n| {
                AddedEvent {
                    by: n as i64 % 10 + 1,
                }
                .into()
            })
            .collect();
        for (chunk, events) in batch.chunks(100).enumerate() {
            store
                .append::<Counter>(
                    &id,
                    (chunk * 100) as u64,
                    events.to_vec(),
                    &Metadata::default(),
                )
                .await
                .expect("append");
        }
    }
    let total = per_stream * STREAMS;
    eprintln!(
        "appended {total} events in {:.1} s; {rounds} rounds",
        started.elapsed().as_secs_f64()
    );

    let variants = [
        "thalo PgSubscription, handle_batch (1 upsert/batch)",
        "thalo PgSubscription, handle (1 upsert/event)",
        "raw sqlx, same pages and upserts",
        "one INSERT ... SELECT (set-based floor)",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut version = 1u32;
    for round in 0..rounds {
        for offset in 0..variants.len() {
            let variant = (round + offset) % variants.len();
            version += 1;
            let table = ReadModelTable::new(store.schema(), "totals", version).expect("table");
            Totals::create(&pool, &table).await;
            let started = Instant::now();
            match variant {
                0 | 1 => {
                    let subscription = PgSubscription::new::<Counter>(
                        store.clone(),
                        Totals {
                            table: table.clone(),
                            per_event: variant == 1,
                        },
                    )
                    .with_batch_size(BATCH)
                    .with_read_model(vec![table.clone()]);
                    let applied = subscription.catch_up().await.expect("rebuild");
                    assert_eq!(applied.applied, total);
                }
                2 => raw_rebuild(&pool, &schema, table.table()).await,
                _ => set_based(&pool, &schema, table.table()).await,
            }
            times[variant].push(started.elapsed().as_secs_f64());
            let rows: i64 =
                sqlx::query_scalar(&format!("SELECT sum(events)::int8 FROM {}", table.table()))
                    .fetch_one(&pool)
                    .await
                    .expect("check");
            assert_eq!(rows as usize, total, "{}", variants[variant]);
        }
    }

    let raw = median(times[2].clone());
    println!();
    println!("Rebuild of {total} events ({STREAMS} streams), median of {rounds} rounds");
    println!();
    println!("| variant | seconds | events/s | vs raw sqlx |");
    println!("| --- | ---: | ---: | ---: |");
    for (variant, name) in variants.iter().enumerate() {
        let seconds = median(times[variant].clone());
        println!(
            "| {name} | {seconds:.2} | {:.0} | {:.2}x |",
            total as f64 / seconds,
            raw / seconds
        );
    }
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .expect("drop schema");
}
