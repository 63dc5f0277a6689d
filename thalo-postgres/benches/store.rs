//! `PgEventStore` against hand-written sqlx doing the same work (the physical limit).
//!
//! Run by hand against a local Postgres (not in CI):
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/thalo_test cargo bench -p thalo-postgres --bench store
//! ```
//!
//! `BENCH_ONLY=group` runs only the group-commit table (section 4).
//!
//! Every variant runs in the same process against the same fresh schema, in interleaved
//! rounds (the order rotates every round) after a warm-up round; the tables show the
//! median of the rounds. The pool has `test_before_acquire(false)` for thalo and the raw
//! variants alike.

#![allow(missing_docs, clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use chrono::{SubsecRound, Utc};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool, Row};
use thalo::{
    commands, events, Aggregate, AggregateType, CommandId, Error, EventStore, Metadata, Repository,
};
use thalo_postgres::{GroupCommit, NotifyMode, PgEventStore};
use uuid::Uuid;

/// Measured rounds (after one warm-up round); `BENCH_ROUNDS` overrides it.
const DEFAULT_ROUNDS: usize = 7;

#[derive(Aggregate, Clone, Debug, Default, Serialize, Deserialize)]
#[aggregate(name = "bench_counter", snapshot)]
pub struct Counter {
    #[identity]
    id: String,
    value: i64,
    count: u64,
}

#[commands]
impl Counter {
    pub fn add(&self, by: i64) -> Result<AddedEvent, Error> {
        if by == 0 {
            return Err(Error::invariant_code("ZERO"));
        }
        Ok(AddedEvent { by })
    }
}

#[events]
impl Counter {
    pub fn added(&mut self, by: i64) {
        self.value += by;
        self.count += 1;
    }
}

/// What the raw variants deserialize into (the same struct the macros generate).
#[derive(Serialize, Deserialize)]
struct RawAdded {
    by: i64,
}

struct Bench {
    pool: PgPool,
    schema: String,
    /// Notify after commit (the default), no snapshots.
    store: PgEventStore,
    store_in_tx: PgEventStore,
    store_quiet: PgEventStore,
    store_snapshots: PgEventStore,
    /// [`Bench::store`] with group commit.
    store_group: PgEventStore,
    /// Repositories with an aggregate cache over [`Bench::store`] and
    /// [`Bench::store_group`], shared by all clients.
    cached: Repository<PgEventStore>,
    group_cached: Repository<PgEventStore>,
    sql: RawSql,
}

/// Aggregates the cached repositories keep (more than any run touches).
const CACHE_CAPACITY: usize = 1_000_000;

struct RawSql {
    select_stream: String,
    insert_event: String,
    insert_outbox: String,
    append_one: String,
    append_one_quiet: String,
    append_many: String,
    select_snapshot: String,
    select_after: String,
    channel: String,
}

impl RawSql {
    fn new(schema: &str) -> Self {
        let events = format!("\"{schema}\".events");
        let outbox = format!("\"{schema}\".outbox");
        RawSql {
            select_stream: format!(
                "SELECT sequence, payload::text FROM {events} WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence"
            ),
            insert_event: format!(
                "INSERT INTO {events} (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9) RETURNING position"
            ),
            insert_outbox: format!("INSERT INTO {outbox} (position) VALUES ($1)"),
            append_one: format!(
                "WITH ins AS (
                    INSERT INTO {events} (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, created_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9) RETURNING position
                 ), ob AS (INSERT INTO {outbox} (position) SELECT position FROM ins)
                 SELECT position, pg_notify($10, position::text)::text FROM ins"
            ),
            append_one_quiet: format!(
                "WITH ins AS (
                    INSERT INTO {events} (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, created_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9) RETURNING position
                 ), ob AS (INSERT INTO {outbox} (position) SELECT position FROM ins)
                 SELECT position FROM ins"
            ),
            append_many: format!(
                "WITH ins AS (
                    INSERT INTO {events} (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, created_at)
                    SELECT e.id, $1, $2, e.seq, e.ty, e.ver, e.payload::jsonb, $7::jsonb, $8
                    FROM UNNEST($3::uuid[], $4::int8[], $5::text[], $6::int2[], $9::text[]) AS e(id, seq, ty, ver, payload)
                    RETURNING position
                 ), ob AS (INSERT INTO {outbox} (position) SELECT position FROM ins ORDER BY position)
                 SELECT array_agg(position ORDER BY position), pg_notify($10, max(position)::text)::text FROM ins"
            ),
            select_snapshot: format!(
                "SELECT version, payload::text FROM \"{schema}\".snapshots WHERE aggregate_type = $1 AND aggregate_id = $2"
            ),
            select_after: format!(
                "SELECT sequence, payload::text FROM {events} WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 ORDER BY sequence"
            ),
            channel: format!("{schema}_events"),
        }
    }
}

fn fail(context: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("benchmark failed: {context}: {err}");
    std::process::exit(1);
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

impl Bench {
    // ---- 1. commands ----------------------------------------------------------------

    /// One command through the repository: load, decide, append (+ outbox, notify).
    async fn thalo_command(repo: &Repository<PgEventStore>, id: &String) {
        if let Err(err) = repo
            .execute::<Counter>(id, CounterCommand::Add { by: 1 })
            .await
        {
            fail("execute", err);
        }
    }

    /// One command with an idempotency key (a fresh one, as every new client request
    /// has): look the key up, load, decide, append with the key.
    async fn thalo_command_once(repo: &Repository<PgEventStore>, id: &String) {
        if let Err(err) = repo
            .execute_once::<Counter>(id, CommandId::random(), CounterCommand::Add { by: 1 })
            .await
        {
            fail("execute_once", err);
        }
    }

    /// The same work by hand, as a textbook transaction: BEGIN, SELECT the stream,
    /// INSERT the event, INSERT the outbox row, NOTIFY, COMMIT.
    async fn raw_command_tx(&self, id: &str) {
        let result: Result<(), sqlx::Error> = async {
            let mut tx = self.pool.begin().await?;
            let (state, version) = self.raw_replay(&mut tx, id).await?;
            let event = AddedEvent { by: 1 };
            let _ = state;
            let payload =
                serde_json::to_string(&event).map_err(|e| sqlx::Error::Decode(e.into()))?;
            let position: i64 = sqlx::query_scalar(&self.sql.insert_event)
                .bind(Uuid::now_v7())
                .bind(Counter::TYPE)
                .bind(id)
                .bind(version + 1)
                .bind("Added")
                .bind(1_i16)
                .bind(payload)
                .bind("{}")
                .bind(Utc::now().trunc_subsecs(6))
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query(&self.sql.insert_outbox)
                .bind(position)
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&self.sql.channel)
                .bind(position.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await;
        if let Err(err) = result {
            fail("raw command", err);
        }
    }

    /// The minimum: SELECT the stream, then one statement inserting the event and its
    /// outbox row and notifying (autocommit). Two round trips, like `execute`.
    async fn raw_command_min(&self, id: &str, notify: bool) {
        let result: Result<(), sqlx::Error> = async {
            let mut conn = self.pool.acquire().await?;
            let (_state, version) = self.raw_replay(&mut conn, id).await?;
            let payload = serde_json::to_string(&AddedEvent { by: 1 })
                .map_err(|e| sqlx::Error::Decode(e.into()))?;
            let sql = if notify {
                &self.sql.append_one
            } else {
                &self.sql.append_one_quiet
            };
            let mut query = sqlx::query(sql)
                .bind(Uuid::now_v7())
                .bind(Counter::TYPE)
                .bind(id)
                .bind(version + 1)
                .bind("Added")
                .bind(1_i16)
                .bind(payload)
                .bind("{}")
                .bind(Utc::now().trunc_subsecs(6));
            if notify {
                query = query.bind(&self.sql.channel);
            }
            query.fetch_one(&mut *conn).await?;
            Ok(())
        }
        .await;
        if let Err(err) = result {
            fail("raw command", err);
        }
    }

    async fn raw_replay(
        &self,
        conn: &mut sqlx::PgConnection,
        id: &str,
    ) -> Result<(Counter, i64), sqlx::Error> {
        let rows = sqlx::query(&self.sql.select_stream)
            .bind(Counter::TYPE)
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
        let mut state = Counter::default();
        let mut version = 0;
        for row in &rows {
            version = row.try_get::<i64, _>(0)?;
            let added: RawAdded = serde_json::from_str(row.try_get::<&str, _>(1)?)
                .map_err(|e| sqlx::Error::Decode(e.into()))?;
            state.value += added.by;
            state.count += 1;
        }
        Ok((state, version))
    }

    /// Runs `per_client` commands on each of `clients` concurrent clients, each on its
    /// own aggregates (10 commands per aggregate, so streams stay short), and returns
    /// commands per second.
    async fn commands(
        self: &Arc<Self>,
        variant: &str,
        clients: usize,
        per_client: usize,
        round: &str,
    ) -> f64 {
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|client| {
                let bench = Arc::clone(self);
                let variant = variant.to_owned();
                let round = round.to_owned();
                tokio::spawn(async move {
                    let repo = Repository::new(bench.store.clone());
                    let in_tx = Repository::new(bench.store_in_tx.clone());
                    let quiet = Repository::new(bench.store_quiet.clone());
                    for i in 0..per_client {
                        let id = format!("{variant}-{round}-{client}-{}", i / 10);
                        match variant.as_str() {
                            "thalo" => Self::thalo_command(&repo, &id).await,
                            "thalo-in-tx" => Self::thalo_command(&in_tx, &id).await,
                            "thalo-quiet" => Self::thalo_command(&quiet, &id).await,
                            "thalo-cached" => Self::thalo_command(&bench.cached, &id).await,
                            "thalo-once" => Self::thalo_command_once(&repo, &id).await,
                            "raw-tx" => bench.raw_command_tx(&id).await,
                            "raw-min" => bench.raw_command_min(&id, true).await,
                            "raw-min-quiet" => bench.raw_command_min(&id, false).await,
                            other => fail("variant", other),
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            if let Err(err) = task.await {
                fail("client task", err);
            }
        }
        (clients * per_client) as f64 / started.elapsed().as_secs_f64()
    }

    /// Group-commit table: like [`Bench::commands`] (10 commands per aggregate, each
    /// client on its own aggregates), but also records every command's latency.
    /// Returns commands per second and the latencies in seconds.
    async fn group_commands(
        self: &Arc<Self>,
        variant: &str,
        clients: usize,
        per_client: usize,
        round: &str,
    ) -> (f64, Vec<f64>) {
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|client| {
                let bench = Arc::clone(self);
                let variant = variant.to_owned();
                let round = round.to_owned();
                tokio::spawn(async move {
                    let repo = Repository::new(bench.store.clone());
                    let group = Repository::new(bench.store_group.clone());
                    let mut latencies = Vec::with_capacity(per_client);
                    for i in 0..per_client {
                        let id = format!("g-{variant}-{round}-{client}-{}", i / 10);
                        let began = Instant::now();
                        match variant.as_str() {
                            "thalo" => Self::thalo_command(&repo, &id).await,
                            "thalo-group" => Self::thalo_command(&group, &id).await,
                            "thalo-group-cached" => {
                                Self::thalo_command(&bench.group_cached, &id).await;
                            }
                            "raw-min-quiet" => bench.raw_command_min(&id, false).await,
                            other => fail("variant", other),
                        }
                        latencies.push(began.elapsed().as_secs_f64());
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::with_capacity(clients * per_client);
        for task in tasks {
            match task.await {
                Ok(l) => latencies.extend(l),
                Err(err) => fail("client task", err),
            }
        }
        let rate = (clients * per_client) as f64 / started.elapsed().as_secs_f64();
        (rate, latencies)
    }

    // ---- 2. batch append --------------------------------------------------------------

    async fn append_100_thalo(&self, id: &String) {
        let events: Vec<CounterEvent> = (1..=100).map(|by| AddedEvent { by }.into()).collect();
        if let Err(err) = self
            .store
            .append::<Counter>(id, 0, events, &Metadata::default())
            .await
        {
            fail("append", err);
        }
    }

    async fn append_100_raw(&self, id: &str) {
        let events: Vec<AddedEvent> = (1..=100).map(|by| AddedEvent { by }).collect();
        let result: Result<(), sqlx::Error> = async {
            let mut ids = Vec::with_capacity(100);
            let mut seqs = Vec::with_capacity(100);
            let mut types = Vec::with_capacity(100);
            let mut versions = Vec::with_capacity(100);
            let mut payloads = Vec::with_capacity(100);
            for (i, event) in events.iter().enumerate() {
                ids.push(Uuid::now_v7());
                seqs.push(i as i64 + 1);
                types.push("Added");
                versions.push(1_i16);
                payloads
                    .push(serde_json::to_string(event).map_err(|e| sqlx::Error::Decode(e.into()))?);
            }
            sqlx::query(&self.sql.append_many)
                .bind(Counter::TYPE)
                .bind(id)
                .bind(&ids)
                .bind(&seqs)
                .bind(&types)
                .bind(&versions)
                .bind("{}")
                .bind(Utc::now().trunc_subsecs(6))
                .bind(&payloads)
                .bind(&self.sql.channel)
                .fetch_one(&self.pool)
                .await?;
            Ok(())
        }
        .await;
        if let Err(err) = result {
            fail("raw append", err);
        }
    }

    // ---- 3. loading ----------------------------------------------------------------------

    async fn load_thalo(store: &PgEventStore, id: &String) -> u64 {
        match store.load::<Counter>(id).await {
            Ok(loaded) => loaded.version,
            Err(err) => fail("load", err),
        }
    }

    async fn load_raw(&self, id: &str) -> u64 {
        let result: Result<(Counter, i64), sqlx::Error> = async {
            let mut conn = self.pool.acquire().await?;
            self.raw_replay(&mut conn, id).await
        }
        .await;
        match result {
            Ok((_, version)) => version as u64,
            Err(err) => fail("raw load", err),
        }
    }

    /// Raw snapshot load: the snapshot row, then the events after it, streamed.
    async fn load_raw_snapshot(&self, id: &str) -> u64 {
        let result: Result<u64, sqlx::Error> = async {
            let mut conn = self.pool.acquire().await?;
            let (version, payload): (i64, String) = sqlx::query_as(&self.sql.select_snapshot)
                .bind(Counter::TYPE)
                .bind(id)
                .fetch_one(&mut *conn)
                .await?;
            let mut state: Counter =
                serde_json::from_str(&payload).map_err(|e| sqlx::Error::Decode(e.into()))?;
            let mut version = version;
            let mut rows = sqlx::query(&self.sql.select_after)
                .bind(Counter::TYPE)
                .bind(id)
                .bind(version)
                .fetch(&mut *conn);
            while let Some(row) = rows.try_next().await? {
                version = row.try_get(0)?;
                let added: RawAdded = serde_json::from_str(row.try_get::<&str, _>(1)?)
                    .map_err(|e| sqlx::Error::Decode(e.into()))?;
                state.value += added.by;
            }
            Ok(version as u64)
        }
        .await;
        match result {
            Ok(version) => version,
            Err(err) => fail("raw snapshot load", err),
        }
    }
}

/// Median seconds per call of `f` over `iterations` calls.
async fn time_per_call<F, Fut>(iterations: usize, mut f: F) -> f64
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    for i in 0..iterations {
        f(i).await;
    }
    started.elapsed().as_secs_f64() / iterations as f64
}

fn machine() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or_else(
            || "?".to_owned(),
            |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0),
        );
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    format!("{nproc} cores ({cpu}), {memory} RAM")
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => fail("runtime", err),
    };
    runtime.block_on(run());
}

async fn run() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS)
        .max(1);
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/thalo_test".into());
    let options = PgConnectOptions::from_str(&url).unwrap_or_else(|e| fail("DATABASE_URL", e));
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .min_connections(40)
        // Both thalo and the raw variants use this pool; without it sqlx pings every
        // connection it hands out (one more round trip per store call).
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .unwrap_or_else(|e| fail(&format!("connecting to DATABASE_URL={url}"), e));
    let schema = format!("bench_{}", Uuid::new_v4().simple());
    let build = |notify: NotifyMode, snapshots: u64| {
        PgEventStore::builder(pool.clone())
            .schema(&schema)
            .notify_mode(notify)
            .snapshot_every::<Counter>(snapshots)
            .build()
            .unwrap_or_else(|e| fail("store", e))
    };
    let store = build(NotifyMode::AfterCommit, 0);
    store.migrate().await.unwrap_or_else(|e| fail("migrate", e));
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| fail("version", e));
    let store_group = PgEventStore::builder(pool.clone())
        .schema(&schema)
        .group_commit(GroupCommit::default())
        .build()
        .unwrap_or_else(|e| fail("store", e));
    let bench = Arc::new(Bench {
        pool: pool.clone(),
        schema: schema.clone(),
        store_in_tx: build(NotifyMode::InTransaction, 0),
        store_quiet: build(NotifyMode::Off, 0),
        store_snapshots: build(NotifyMode::AfterCommit, 100),
        cached: Repository::new(store.clone()).with_cache(CACHE_CAPACITY),
        group_cached: Repository::new(store_group.clone()).with_cache(CACHE_CAPACITY),
        store_group,
        store,
        sql: RawSql::new(&schema),
    });

    println!("# thalo-postgres benchmark\n");
    println!("- machine: {}", machine());
    println!("- PostgreSQL {version} on the same machine (loopback)");
    println!("- {rounds} interleaved rounds after a warm-up round; medians");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    println!("- load average at the start (other processes on the machine): {load}\n");

    if std::env::var("BENCH_ONLY").as_deref() == Ok("group") {
        group_commit_table(&bench, rounds).await;
        drop_schema(&pool, &schema).await;
        return;
    }

    // ---- 1. commands ----
    let mut results: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    let variants = selected(&[
        "thalo",
        "raw-min",
        "raw-tx",
        "thalo-in-tx",
        "thalo-quiet",
        "raw-min-quiet",
        "thalo-cached",
        "thalo-once",
    ]);
    let levels = [(1, 300), (8, 100), (32, 40)];
    for round in 0..=rounds {
        for &(clients, per_client) in &levels {
            // Rotate the order every round so that no variant always runs first.
            for k in 0..variants.len() {
                let variant = variants[(k + round) % variants.len()];
                let rate = bench
                    .commands(variant, clients, per_client, &format!("r{round}"))
                    .await;
                if round > 0 {
                    results.entry((clients, variant)).or_default().push(rate);
                }
            }
        }
        eprintln!("commands: round {round} done");
    }
    println!("## 1. Commands per second (`Repository::execute`: load, decide, append 1 event + outbox row)\n");
    println!("Each client runs commands on its own aggregates, 10 commands per aggregate (streams of 0-9 events when loaded).\n");
    println!("Thalo's defaults (notify after commit, from a background task), against the raw limit (the same two statements on one connection, no NOTIFY):\n");
    println!("| clients | thalo `execute` | raw minimal: SELECT + one INSERT statement | thalo / raw minimal | thalo, `NotifyMode::Off` | thalo off / raw minimal |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let m =
        |clients: usize, v: &str| median(results.get(&(clients, v)).cloned().unwrap_or_default());
    for &(clients, _) in &levels {
        let (t, rq, q) = (
            m(clients, "thalo"),
            m(clients, "raw-min-quiet"),
            m(clients, "thalo-quiet"),
        );
        println!(
            "| {clients} | {t:.0} | {rq:.0} | {:.0}% | {q:.0} | {:.0}% |",
            100.0 * t / rq,
            100.0 * q / rq
        );
    }
    println!("\nWith the aggregate cache (`Repository::with_cache`): the first command on an aggregate loads it, the next nine start from the cache (one statement each):\n");
    println!("| clients | thalo `execute`, cached | raw minimal: SELECT + one INSERT statement | thalo cached / raw minimal | thalo cached / thalo |");
    println!("|---:|---:|---:|---:|---:|");
    for &(clients, _) in &levels {
        let (c, t, rq) = (
            m(clients, "thalo-cached"),
            m(clients, "thalo"),
            m(clients, "raw-min-quiet"),
        );
        println!(
            "| {clients} | {c:.0} | {rq:.0} | {:.0}% | {:.2}x |",
            100.0 * c / rq,
            c / t
        );
    }
    println!("\nIdempotent commands (`Repository::execute_once` with a new key per command: load, decide, and an append that records the key in its statement), against plain `execute`:\n");
    println!("| clients | thalo `execute_once` | thalo `execute` | raw minimal: SELECT + one INSERT statement | once / execute | once / raw minimal |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &(clients, _) in &levels {
        let (o, t, rq) = (
            m(clients, "thalo-once"),
            m(clients, "thalo"),
            m(clients, "raw-min-quiet"),
        );
        println!(
            "| {clients} | {o:.0} | {t:.0} | {rq:.0} | {:.2}x | {:.0}% |",
            o / t,
            100.0 * o / rq
        );
    }
    println!("\nNotify inside the append's transaction (`NotifyMode::InTransaction`), against raw SQL that also notifies in the transaction:\n");
    println!("| clients | thalo `execute` | raw minimal + NOTIFY | raw transaction: BEGIN, SELECT, INSERT, INSERT, NOTIFY, COMMIT | thalo / raw minimal | thalo / raw transaction |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &(clients, _) in &levels {
        let (t, rm, rt) = (
            m(clients, "thalo-in-tx"),
            m(clients, "raw-min"),
            m(clients, "raw-tx"),
        );
        println!(
            "| {clients} | {t:.0} | {rm:.0} | {rt:.0} | {:.0}% | {:.0}% |",
            100.0 * t / rm,
            100.0 * t / rt
        );
    }

    if std::env::var("BENCH_ONLY").as_deref() == Ok("commands") {
        drop_schema(&pool, &schema).await;
        return;
    }

    // ---- 2. append 100 ----
    let mut thalo_append = Vec::new();
    let mut raw_append = Vec::new();
    for round in 0..=rounds {
        let t = time_per_call(30, |i| {
            let bench = &bench;
            let id = format!("append-thalo-{round}-{i}");
            async move { bench.append_100_thalo(&id).await }
        })
        .await;
        let r = time_per_call(30, |i| {
            let bench = &bench;
            let id = format!("append-raw-{round}-{i}");
            async move { bench.append_100_raw(&id).await }
        })
        .await;
        if round > 0 {
            thalo_append.push(t);
            raw_append.push(r);
        }
    }
    let (t, r) = (median(thalo_append) * 1e3, median(raw_append) * 1e3);
    println!("\n## 2. Appending 100 events in one call (+ 100 outbox rows)\n");
    println!("| thalo `append` | raw multi-row insert (one statement) | ratio |");
    println!("|---:|---:|---:|");
    println!("| {t:.2} ms | {r:.2} ms | {:.2}x |", t / r);

    // ---- 3. load 10k ----
    let big = "load-big".to_owned();
    let total = 10_000_u64;
    let snapshot_at = 9_950_u64;
    let mut version = 0;
    while version < snapshot_at {
        let n = (snapshot_at - version).min(1000);
        let events: Vec<CounterEvent> = (0..n)
            .map(|i| AddedEvent { by: i as i64 + 1 }.into())
            .collect();
        bench
            .store
            .append::<Counter>(&big, version, events, &Metadata::default())
            .await
            .unwrap_or_else(|e| fail("seeding", e));
        version += n;
    }
    // Loading with the snapshot policy now writes a snapshot at 9,950 ...
    Bench::load_thalo(&bench.store_snapshots, &big).await;
    // ... and 50 more events make the snapshot load replay a realistic tail.
    let events: Vec<CounterEvent> = (0..total - snapshot_at)
        .map(|_| AddedEvent { by: 1 }.into())
        .collect();
    bench
        .store
        .append::<Counter>(&big, snapshot_at, events, &Metadata::default())
        .await
        .unwrap_or_else(|e| fail("seeding", e));
    let has_snapshot: i64 = sqlx::query_scalar(&format!(
        "SELECT version FROM \"{}\".snapshots",
        bench.schema
    ))
    .fetch_one(&bench.pool)
    .await
    .unwrap_or_else(|e| fail("snapshot check", e));
    assert_eq!(has_snapshot as u64, snapshot_at);

    let mut loads: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..=rounds {
        let samples = [
            (
                "thalo",
                time_per_call(5, |_| async {
                    assert_eq!(Bench::load_thalo(&bench.store, &big).await, total)
                })
                .await,
            ),
            (
                "raw",
                time_per_call(5, |_| async {
                    assert_eq!(bench.load_raw(&big).await, total)
                })
                .await,
            ),
            (
                "thalo-snapshot",
                time_per_call(20, |_| async {
                    assert_eq!(Bench::load_thalo(&bench.store_snapshots, &big).await, total)
                })
                .await,
            ),
            (
                "raw-snapshot",
                time_per_call(20, |_| async {
                    assert_eq!(bench.load_raw_snapshot(&big).await, total)
                })
                .await,
            ),
        ];
        if round > 0 {
            for (name, seconds) in samples {
                loads.entry(name).or_default().push(seconds);
            }
        }
    }
    let ms = |name: &str| median(loads.get(name).cloned().unwrap_or_default()) * 1e3;
    println!("\n## 3. Loading an aggregate with 10,000 events\n");
    println!("| | thalo `load` | raw SELECT + deserialize | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| full replay | {:.2} ms | {:.2} ms | {:.2}x |",
        ms("thalo"),
        ms("raw"),
        ms("thalo") / ms("raw")
    );
    println!(
        "| snapshot at 9,950 + 50 events | {:.2} ms | {:.2} ms | {:.2}x |",
        ms("thalo-snapshot"),
        ms("raw-snapshot"),
        ms("thalo-snapshot") / ms("raw-snapshot")
    );

    group_commit_table(&bench, rounds).await;
    drop_schema(&pool, &schema).await;
}

async fn drop_schema(pool: &PgPool, schema: &str) {
    let drop = format!("DROP SCHEMA \"{schema}\" CASCADE");
    if let Err(err) = pool.execute(drop.as_str()).await {
        eprintln!("could not drop {schema}: {err}");
    }
}

/// `all`, or only those named in `BENCH_VARIANTS` (comma-separated), for profiling one
/// variant at a time (their tables then show `NaN` for the others).
fn selected(all: &[&'static str]) -> Vec<&'static str> {
    let only = std::env::var("BENCH_VARIANTS").ok();
    all.iter()
        .copied()
        .filter(|v| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *v))
        })
        .collect()
}

/// Section 4: group commit against one transaction per command, at many clients.
async fn group_commit_table(bench: &Arc<Bench>, rounds: usize) {
    let variants = selected(&[
        "thalo",
        "thalo-group",
        "raw-min-quiet",
        "thalo-group-cached",
    ]);
    let levels = [(8, 40), (32, 20), (256, 8)];
    // Per (clients, variant): the rate, p50 and p99 of each round.
    let mut results: BTreeMap<(usize, &str), [Vec<f64>; 3]> = BTreeMap::new();
    for round in 0..=rounds {
        for &(clients, per_client) in &levels {
            for k in 0..variants.len() {
                let variant = variants[(k + round) % variants.len()];
                let (rate, latencies) = bench
                    .group_commands(variant, clients, per_client, &format!("r{round}"))
                    .await;
                if round > 0 {
                    let entry = results.entry((clients, variant)).or_default();
                    entry[0].push(rate);
                    entry[1].push(quantile(latencies.clone(), 0.5));
                    entry[2].push(quantile(latencies, 0.99));
                }
            }
        }
        eprintln!("group commit: round {round} done");
    }
    let m = |clients: usize, v: &str, i: usize| {
        median(
            results
                .get(&(clients, v))
                .map(|r| r[i].clone())
                .unwrap_or_default(),
        )
    };
    println!(
        "\n## 4. Group commit (`Repository::execute`, notify after commit; raw without NOTIFY)\n"
    );
    println!("Each client runs commands on its own aggregates, 10 commands per aggregate. Commands/s, and p50 / p99 latency per command in ms (medians over rounds).\n");
    println!("| clients | thalo, one tx per command | thalo, group commit | raw minimal, one tx per command | group commit / raw | thalo, group commit + aggregate cache | group commit + cache / raw |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &(clients, _) in &levels {
        let cell = |v: &str| {
            format!(
                "{:.0}/s, {:.1} / {:.1} ms",
                m(clients, v, 0),
                m(clients, v, 1) * 1e3,
                m(clients, v, 2) * 1e3
            )
        };
        println!(
            "| {clients} | {} | {} | {} | {:.2}x | {} | {:.2}x |",
            cell("thalo"),
            cell("thalo-group"),
            cell("raw-min-quiet"),
            m(clients, "thalo-group", 0) / m(clients, "raw-min-quiet", 0),
            cell("thalo-group-cached"),
            m(clients, "thalo-group-cached", 0) / m(clients, "raw-min-quiet", 0)
        );
    }
}
