//! Shared test helpers: a fresh schema per test in the `thalo_test` database, and a
//! small aggregate.
//!
//! Tests need a real Postgres at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/thalo_test`); the database is created when
//! missing. An unreachable server fails the test with a message naming `DATABASE_URL`:
//! these tests never skip.

#![allow(dead_code, missing_docs, unreachable_pub)]

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};
use thalo::{
    commands, events, Aggregate, CheckpointStore, CommandKey, Decided, Error, EventEnvelope,
    EventStore, Loaded, Metadata, Once, RawEvent, Recorded, Rejection,
};
use thalo_postgres::{PgEventStore, PgEventStoreBuilder};
use tokio::sync::OnceCell;
use uuid::Uuid;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/thalo_test";

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

fn unreachable(url: &str, err: &dyn std::fmt::Display) -> ! {
    if std::env::var("THALO_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!(
            "PostgreSQL is required (THALO_REQUIRE_SERVICES=1) but not reachable at \
             DATABASE_URL={url}: {err}"
        );
    }
    panic!(
        "PostgreSQL is not reachable at DATABASE_URL={url}: {err}. Start it (scripts/test.sh \
         does) or point DATABASE_URL at a server; these tests never skip."
    );
}

fn connect_options() -> PgConnectOptions {
    let url = database_url();
    match PgConnectOptions::from_str(&url) {
        Ok(options) => options.log_statements(tracing::log::LevelFilter::Trace),
        Err(err) => panic!("invalid DATABASE_URL={url}: {err}"),
    }
}

/// Creates the test database once per process; tolerates a parallel creator.
async fn ensure_database() {
    static CREATED: OnceCell<()> = OnceCell::const_new();
    CREATED
        .get_or_init(|| async {
            let url = database_url();
            let options = connect_options();
            let name = options.get_database().unwrap_or("postgres").to_owned();
            let mut admin = match options.clone().database("postgres").connect().await {
                Ok(conn) => conn,
                Err(err) => unreachable(&url, &err),
            };
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(&name)
                    .fetch_one(&mut admin)
                    .await
                    .expect("query pg_database");
            if !exists {
                let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
                match admin.execute(create.as_str()).await {
                    Ok(_) => {}
                    // Another test process created it first.
                    Err(sqlx::Error::Database(db))
                        if matches!(db.code().as_deref(), Some("42P04" | "23505")) => {}
                    Err(err) => panic!("cannot create the test database {name}: {err}"),
                }
            }
            let _ = admin.close().await;
        })
        .await;
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
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
                if let Ok(mut conn) = connect_options().connect().await {
                    // A connection of the test's pool may still hold a lock in the schema
                    // (a dropped transaction whose ROLLBACK waits for the test's runtime,
                    // which this drop blocks): give up rather than wait forever, and
                    // leave the schema behind.
                    let _ = conn.execute("SET lock_timeout = '5s'").await;
                    let _ = conn.execute(statement.as_str()).await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// A migrated store in a fresh schema.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub store: PgEventStore,
    pub pool: PgPool,
    pub schema: String,
    pub guard: Arc<SchemaGuard>,
}

impl TestDb {
    /// `schema.table`, quoted, for SQL written by the tests.
    pub fn table(&self, table: &str) -> String {
        format!("\"{}\".{table}", self.schema)
    }
}

pub fn random_schema() -> String {
    format!("t_{}", Uuid::new_v4().simple())
}

pub async fn pool(max_connections: u32) -> PgPool {
    init_tracing();
    ensure_database().await;
    match PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(connect_options())
        .await
    {
        Ok(pool) => pool,
        Err(err) => unreachable(&database_url(), &err),
    }
}

/// A store with the default configuration in a fresh schema.
pub async fn store() -> TestDb {
    store_with(10, |b| b).await
}

/// A store in a fresh schema, configured by `configure`, on a pool of `max_connections`.
pub async fn store_with(
    max_connections: u32,
    configure: impl FnOnce(PgEventStoreBuilder) -> PgEventStoreBuilder,
) -> TestDb {
    let pool = pool(max_connections).await;
    let schema = random_schema();
    let guard = Arc::new(SchemaGuard {
        schema: schema.clone(),
    });
    let store = configure(PgEventStore::builder(pool.clone()).schema(&schema))
        .build()
        .expect("valid configuration");
    store.migrate().await.expect("migrate");
    TestDb {
        store,
        pool,
        schema,
        guard,
    }
}

/// A store handle that drops its schema when the last clone is dropped (for the
/// conformance suite, which only receives the store).
#[derive(Debug, Clone)]
pub struct GuardedStore {
    pub store: PgEventStore,
    pub guard: Arc<SchemaGuard>,
}

impl EventStore for GuardedStore {
    async fn load<A: Aggregate>(&self, id: &A::Id) -> Result<Loaded<A>, Error> {
        self.store.load(id).await
    }

    async fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.store
            .append::<A>(id, expected_version, events, metadata)
            .await
    }

    // Forwarded so that the suite's `execute` checks run `PgEventStore`'s one-connection
    // override, not the trait's default.
    async fn load_decide_append<A, F>(
        &self,
        id: &A::Id,
        metadata: &Metadata,
        decide: F,
    ) -> Result<Decided<A>, Error>
    where
        A: Aggregate,
        F: FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send,
    {
        self.store
            .load_decide_append::<A, F>(id, metadata, decide)
            .await
    }

    async fn find_command<A: Aggregate>(
        &self,
        id: &A::Id,
        key: &CommandKey,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        self.store.find_command::<A>(id, key).await
    }

    async fn record_command<A: Aggregate>(
        &self,
        id: &A::Id,
        version: u64,
        key: &CommandKey,
        rejection: Option<&Rejection>,
    ) -> Result<Option<Recorded<A::Event>>, Error> {
        self.store
            .record_command::<A>(id, version, key, rejection)
            .await
    }

    async fn append_once<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
        key: &CommandKey,
    ) -> Result<Once<A::Event>, Error> {
        self.store
            .append_once::<A>(id, expected_version, events, metadata, key)
            .await
    }

    // Forwarded so that the suite's keyed commands run `PgEventStore`'s one-connection
    // override.
    async fn load_decide_once<A, F>(
        &self,
        id: &A::Id,
        metadata: &Metadata,
        key: &CommandKey,
        decide: F,
    ) -> Result<(Loaded<A>, Once<A::Event>), Error>
    where
        A: Aggregate,
        F: FnOnce(&A) -> Result<Vec<A::Event>, Error> + Send,
    {
        self.store
            .load_decide_once::<A, F>(id, metadata, key, decide)
            .await
    }

    async fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        self.store.read_stream::<A>(id, after_sequence).await
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope<RawEvent>>, Error> {
        self.store.read_all(after_position, limit).await
    }

    async fn wait_for_events(&self, after_position: u64, timeout: Duration) {
        self.store.wait_for_events(after_position, timeout).await;
    }
}

impl CheckpointStore for GuardedStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, Error> {
        self.store.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), Error> {
        self.store.save_checkpoint(name, position).await
    }
}

/// An account that supports snapshots.
#[derive(Aggregate, Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[aggregate(name = "pg_test_account", snapshot)]
pub struct Account {
    #[identity]
    pub id: String,
    pub balance: i64,
    pub deposits: u64,
}

#[commands]
impl Account {
    /// Deposits `amount`.
    pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> {
        if amount <= 0 {
            return Err(Error::invariant_code("NON_POSITIVE_AMOUNT"));
        }
        Ok(DepositedEvent { amount })
    }
}

#[events]
impl Account {
    /// Money was deposited.
    pub fn deposited(&mut self, amount: i64) {
        self.balance += amount;
        self.deposits += 1;
    }
}

/// Another aggregate type, without snapshots.
#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "pg_test_note")]
pub struct Note {
    #[identity]
    pub id: String,
    pub text: String,
}

#[commands]
impl Note {
    /// Writes the note.
    pub fn write(&self, text: String) -> Result<WrittenEvent, Error> {
        Ok(WrittenEvent { text })
    }
}

#[events]
impl Note {
    /// The note was written.
    pub fn written(&mut self, text: String) {
        self.text = text;
    }
}

pub fn deposits(amounts: impl IntoIterator<Item = i64>) -> Vec<AccountEvent> {
    amounts
        .into_iter()
        .map(|amount| DepositedEvent { amount }.into())
        .collect()
}

pub fn new_id() -> String {
    format!("acc-{}", Uuid::new_v4())
}

/// Reads the whole global log from the start.
pub async fn read_everything(store: &PgEventStore) -> Vec<EventEnvelope<RawEvent>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_all(after, 1000).await.expect("read all");
        let Some(last) = page.last() else { return out };
        after = last.position;
        out.extend(page);
    }
}

/// A plain connection to the test database (outside any pool).
pub async fn connection() -> PgConnection {
    ensure_database().await;
    match connect_options().connect().await {
        Ok(conn) => conn,
        Err(err) => unreachable(&database_url(), &err),
    }
}

/// What `apply_exactly_once` reports, as a struct the test can write
/// (`Applied` is `#[non_exhaustive]`).
#[derive(Debug)]
pub struct Counts {
    pub applied: usize,
    pub duplicates: usize,
    pub held: usize,
}

impl PartialEq<Counts> for thalo_postgres::Applied {
    fn eq(&self, other: &Counts) -> bool {
        (self.applied, self.duplicates, self.held) == (other.applied, other.duplicates, other.held)
    }
}
