//! The workload every contender implements: a bank account with `Opened` and
//! `Deposited` events, and a deposit command that loads the account, checks that it is
//! open and that the amount is positive, and appends one event.

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use sqlx::PgPool;

/// Identifies an account in the benchmark. Each contender maps it to its own identity
/// type (a string, a UUID or an integer).
pub type AccountKey = u64;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Another writer appended to the stream first; nothing was stored. The harness
    /// runs the command again.
    #[error("concurrency conflict")]
    Conflict,
    /// Anything else: the benchmark stops.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// An account as the contender rebuilt it from its events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// Sum of the deposits (the account opens with 0).
    pub balance: i64,
    /// Number of events applied, including `Opened`.
    pub events: u64,
}

/// One contender bound to a connection pool.
#[async_trait]
pub trait Bank: Send + Sync {
    /// Opens `account` with a balance of 0.
    async fn open(&self, account: AccountKey) -> Result<(), CommandError>;

    /// Runs one deposit command: load, check, append one event.
    async fn deposit(&self, account: AccountKey, amount: i64) -> Result<(), CommandError>;

    /// Rebuilds the account from all its events (no snapshots, for any contender).
    async fn load(&self, account: AccountKey) -> Result<Account>;

    /// Appends one `Deposited` event per amount through the contender's own write path,
    /// as one command (used to build long streams for the load benchmark).
    async fn seed(&self, account: AccountKey, amounts: Vec<i64>) -> Result<()>;

    /// The amounts of the `Deposited` events stored for `account`, read straight from
    /// the contender's table: used to find lost and doubled deposits.
    async fn stored_deposits(&self, account: AccountKey) -> Result<Vec<i64>>;

    /// Conflicts the contender retried internally, without returning
    /// [`CommandError::Conflict`] (Thalo's `Repository` retries by itself).
    fn internal_conflicts(&self) -> u64 {
        0
    }
}

/// A framework under test.
#[async_trait]
pub trait Framework: Send + Sync {
    /// The name printed in the tables.
    fn name(&self) -> &'static str;

    /// The name of its database (created fresh for every run of the benchmark).
    fn database(&self) -> &'static str;

    /// Whether a command also writes an outbox row in the same transaction.
    fn writes_outbox(&self) -> bool;

    /// Connections a pool needs so that `clients` commands can run at once.
    fn pool_size(&self, clients: usize) -> u32 {
        u32::try_from(clients).unwrap_or(u32::MAX).saturating_add(2)
    }

    /// Creates the framework's tables in its fresh database.
    async fn setup(&self, pool: &PgPool) -> Result<()>;

    /// A handle on `pool` for one measurement.
    async fn bind(&self, pool: PgPool) -> Result<Arc<dyn Bank>>;
}

/// Whether a database error is an optimistic-concurrency failure: a unique violation
/// (a second event with the same stream sequence), a serialization failure or a
/// deadlock.
pub fn is_conflict(err: &sqlx::Error) -> bool {
    matches!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("23505" | "40001" | "40P01")
    )
}
