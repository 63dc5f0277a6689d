//! Thalo: `Repository::execute` on `thalo_postgres::PgEventStore`.
//!
//! A deposit is one `SELECT` of the stream (`load`) and one statement that checks the
//! stream's version and inserts the event and its outbox row, both on one pooled
//! connection; the store then notifies its channel from a background task (the default,
//! `NotifyMode::AfterCommit`), or inside the statement (`NotifyMode::InTransaction`). `Repository::execute` retries a conflict
//! by itself (5 attempts by default); [`Counting`] counts those retries.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::thalo::{
    commands, events, Aggregate, Decided, Error, EventEnvelope, EventStore, Loaded, Metadata,
    RawEvent, Repository,
};
use ::thalo_postgres::{NotifyMode, PgEventStore};
use anyhow::Result;
use async_trait::async_trait;
use sqlx::PgPool;

use crate::bank::{Account as Balance, AccountKey, Bank, CommandError, Framework};

/// The bank account.
#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    opened: bool,
    balance: i64,
}

fn check_deposit(account: &Account, amount: i64) -> Result<(), Error> {
    if !account.opened {
        return Err(Error::invariant_code("ACCOUNT_NOT_OPEN"));
    }
    if amount <= 0 {
        return Err(Error::invariant_code("NON_POSITIVE_AMOUNT"));
    }
    Ok(())
}

#[commands]
impl Account {
    /// Opens the account.
    pub fn open(&self) -> Result<OpenedEvent, Error> {
        if self.opened {
            return Err(Error::invariant_code("ACCOUNT_ALREADY_OPENED"));
        }
        Ok(OpenedEvent {})
    }

    /// Deposits one amount.
    pub fn deposit(&self, amount: i64) -> Result<DepositedEvent, Error> {
        check_deposit(self, amount)?;
        Ok(DepositedEvent { amount })
    }

    /// Deposits many amounts (one event each): seeds long streams.
    pub fn deposit_many(&self, amounts: Vec<i64>) -> Result<Vec<DepositedEvent>, Error> {
        amounts
            .into_iter()
            .map(|amount| {
                check_deposit(self, amount)?;
                Ok(DepositedEvent { amount })
            })
            .collect()
    }
}

#[events]
impl Account {
    /// The account was opened.
    pub fn opened(&mut self) {
        self.opened = true;
    }

    /// Money was paid in.
    pub fn deposited(&mut self, amount: i64) {
        self.balance += amount;
    }
}

/// An [`EventStore`] that counts the conflicts its appends report.
#[derive(Debug)]
pub struct Counting<S> {
    inner: S,
    conflicts: AtomicU64,
}

impl<S: EventStore> EventStore for Counting<S> {
    fn load<A: Aggregate>(
        &self,
        id: &A::Id,
    ) -> impl Future<Output = Result<Loaded<A>, Error>> + Send {
        self.inner.load(id)
    }

    async fn append<A: Aggregate>(
        &self,
        id: &A::Id,
        expected_version: u64,
        events: Vec<A::Event>,
        metadata: &Metadata,
    ) -> Result<Vec<EventEnvelope<A::Event>>, Error> {
        let result = self
            .inner
            .append::<A>(id, expected_version, events, metadata)
            .await;
        if result.as_ref().is_err_and(Error::is_conflict) {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

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
        let result = self
            .inner
            .load_decide_append::<A, F>(id, metadata, decide)
            .await;
        if result.as_ref().is_err_and(Error::is_conflict) {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn read_stream<A: Aggregate>(
        &self,
        id: &A::Id,
        after_sequence: u64,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<A::Event>>, Error>> + Send {
        self.inner.read_stream::<A>(id, after_sequence)
    }

    fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventEnvelope<RawEvent>>, Error>> + Send {
        self.inner.read_all(after_position, limit)
    }

    fn wait_for_events(
        &self,
        after_position: u64,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send {
        self.inner.wait_for_events(after_position, timeout)
    }
}

/// Thalo with `PgEventStore`: its defaults (notify after commit) or notify in the
/// append's transaction, with or without the repository's aggregate cache.
#[derive(Clone, Copy, Debug)]
pub struct Thalo {
    /// How appends notify (the store's default: [`NotifyMode::AfterCommit`]).
    pub notify: NotifyMode,
    /// `Repository::with_cache`: commands on an aggregate this process has already
    /// loaded skip the load (one statement per deposit instead of two).
    pub cached: bool,
}

/// Aggregates the cached variant keeps (more than any table uses).
const CACHE_CAPACITY: usize = 100_000;

impl Thalo {
    fn store(&self, pool: PgPool) -> Result<PgEventStore> {
        Ok(PgEventStore::builder(pool)
            .notify_mode(self.notify)
            .build()?)
    }
}

#[async_trait]
impl Framework for Thalo {
    fn name(&self) -> &'static str {
        match (self.notify, self.cached) {
            (_, true) => "thalo (cached)",
            (NotifyMode::InTransaction, _) => "thalo (notify in tx)",
            (NotifyMode::Off, _) => "thalo (notify off)",
            _ => "thalo",
        }
    }

    fn database(&self) -> &'static str {
        match (self.notify, self.cached) {
            (_, true) => "thalo_compare_thalo_cached",
            (NotifyMode::InTransaction, _) => "thalo_compare_thalo_in_tx",
            (NotifyMode::Off, _) => "thalo_compare_thalo_quiet",
            _ => "thalo_compare_thalo",
        }
    }

    fn writes_outbox(&self) -> bool {
        true
    }

    async fn setup(&self, pool: &PgPool) -> Result<()> {
        self.store(pool.clone())?.migrate().await?;
        Ok(())
    }

    async fn bind(&self, pool: PgPool) -> Result<Arc<dyn Bank>> {
        let store = Counting {
            inner: self.store(pool.clone())?,
            conflicts: AtomicU64::new(0),
        };
        let repo = Repository::new(store);
        let repo = if self.cached {
            repo.with_cache(CACHE_CAPACITY)
        } else {
            repo
        };
        Ok(Arc::new(ThaloBank { repo, pool }))
    }
}

struct ThaloBank {
    repo: Repository<Counting<PgEventStore>>,
    pool: PgPool,
}

fn aggregate_id(account: AccountKey) -> String {
    format!("acc-{account}")
}

impl ThaloBank {
    async fn execute(
        &self,
        account: AccountKey,
        command: AccountCommand,
    ) -> Result<(), CommandError> {
        match self
            .repo
            .execute::<Account>(&aggregate_id(account), command)
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if err.is_conflict() => Err(CommandError::Conflict),
            Err(err) => Err(CommandError::Other(err.into())),
        }
    }
}

#[async_trait]
impl Bank for ThaloBank {
    async fn open(&self, account: AccountKey) -> Result<(), CommandError> {
        self.execute(account, AccountCommand::Open {}).await
    }

    async fn deposit(&self, account: AccountKey, amount: i64) -> Result<(), CommandError> {
        self.execute(account, AccountCommand::Deposit { amount })
            .await
    }

    async fn load(&self, account: AccountKey) -> Result<Balance> {
        let loaded = self.repo.load::<Account>(&aggregate_id(account)).await?;
        Ok(Balance {
            balance: loaded.aggregate.balance,
            events: loaded.version,
        })
    }

    async fn seed(&self, account: AccountKey, amounts: Vec<i64>) -> Result<()> {
        self.repo
            .execute::<Account>(
                &aggregate_id(account),
                AccountCommand::DepositMany { amounts },
            )
            .await?;
        Ok(())
    }

    async fn stored_deposits(&self, account: AccountKey) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT (payload->>'amount')::bigint FROM thalo.events \
             WHERE aggregate_type = 'account' AND aggregate_id = $1 AND event_type = 'Deposited'",
        )
        .bind(aggregate_id(account))
        .fetch_all(&self.pool)
        .await?)
    }

    fn internal_conflicts(&self) -> u64 {
        self.repo.store().conflicts.load(Ordering::Relaxed)
    }
}
