//! `esrs` (Prima's event_sourcing.rs) with its Postgres store.
//!
//! The documented way to run a command is `AggregateManager::lock_and_load`, which takes
//! a Postgres advisory lock on the aggregate (on a pooled connection of its own), loads
//! the stream on another connection, and `handle_command`, which inserts one row per
//! event in a transaction and then releases the lock. Commands on one aggregate are
//! therefore serialized by the lock rather than retried: no conflicts, but waits. It
//! writes no outbox row.

use std::sync::Arc;

use ::esrs::manager::AggregateManager;
use ::esrs::store::postgres::{PgStore, PgStoreBuilder, PgStoreError};
use anyhow::{anyhow, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::bank::{is_conflict, Account, AccountKey, Bank, CommandError, Framework};

/// The aggregate (esrs keeps state and behaviour apart).
#[derive(Debug)]
pub struct EsrsAccount;

/// Its state.
#[derive(Clone, Debug, Default)]
pub struct AccountState {
    opened: bool,
    balance: i64,
    events: u64,
}

/// Its events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// The account was opened.
    Opened {},
    /// Money was paid in.
    Deposited {
        /// Minor units.
        amount: i64,
    },
}

/// Its commands.
#[derive(Debug)]
pub enum AccountCommand {
    /// Opens the account.
    Open,
    /// Deposits one amount.
    Deposit(i64),
    /// Deposits many amounts (one event each): seeds long streams.
    DepositMany(Vec<i64>),
}

/// A broken invariant.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AccountError(&'static str);

fn check_deposit(state: &AccountState, amount: i64) -> Result<(), AccountError> {
    if !state.opened {
        return Err(AccountError("ACCOUNT_NOT_OPEN"));
    }
    if amount <= 0 {
        return Err(AccountError("NON_POSITIVE_AMOUNT"));
    }
    Ok(())
}

impl ::esrs::Aggregate for EsrsAccount {
    const NAME: &'static str = "account";
    type State = AccountState;
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle_command(
        state: &AccountState,
        command: AccountCommand,
    ) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open => {
                if state.opened {
                    return Err(AccountError("ACCOUNT_ALREADY_OPENED"));
                }
                Ok(vec![AccountEvent::Opened {}])
            }
            AccountCommand::Deposit(amount) => {
                check_deposit(state, amount)?;
                Ok(vec![AccountEvent::Deposited { amount }])
            }
            AccountCommand::DepositMany(amounts) => amounts
                .into_iter()
                .map(|amount| {
                    check_deposit(state, amount)?;
                    Ok(AccountEvent::Deposited { amount })
                })
                .collect(),
        }
    }

    fn apply_event(mut state: AccountState, event: AccountEvent) -> AccountState {
        match event {
            AccountEvent::Opened {} => state.opened = true,
            AccountEvent::Deposited { amount } => state.balance += amount,
        }
        state.events += 1;
        state
    }
}

/// `esrs` with `PgStore`.
#[derive(Clone, Copy, Debug)]
pub struct Esrs;

#[async_trait]
impl Framework for Esrs {
    fn name(&self) -> &'static str {
        "esrs"
    }

    fn database(&self) -> &'static str {
        "thalo_compare_esrs"
    }

    fn writes_outbox(&self) -> bool {
        false
    }

    /// Each command holds the lock connection while it loads and appends on a second one.
    fn pool_size(&self, clients: usize) -> u32 {
        u32::try_from(2 * clients)
            .unwrap_or(u32::MAX)
            .saturating_add(2)
    }

    async fn setup(&self, pool: &PgPool) -> Result<()> {
        // Runs esrs's own migrations (`CREATE TABLE IF NOT EXISTS account_events ...`).
        PgStoreBuilder::<EsrsAccount>::new(pool.clone())
            .try_build()
            .await?;
        Ok(())
    }

    async fn bind(&self, pool: PgPool) -> Result<Arc<dyn Bank>> {
        let store: PgStore<EsrsAccount> = PgStoreBuilder::new(pool.clone())
            .without_running_migrations()
            .try_build()
            .await?;
        Ok(Arc::new(EsrsBank {
            manager: AggregateManager::new(store),
            pool,
        }))
    }
}

struct EsrsBank {
    manager: AggregateManager<PgStore<EsrsAccount>>,
    pool: PgPool,
}

/// esrs keys its advisory lock on the first 64 bits of the aggregate's UUID only, so the
/// ids must differ there (as random v4 UUIDs do): multiplying by an odd constant is a
/// bijection on `u64`.
fn aggregate_id(account: AccountKey) -> Uuid {
    Uuid::from_u64_pair(account.wrapping_mul(0x9E37_79B9_7F4A_7C15), account)
}

fn store_error(err: PgStoreError) -> CommandError {
    match &err {
        PgStoreError::Sqlx(e) if is_conflict(e) => CommandError::Conflict,
        _ => CommandError::Other(err.into()),
    }
}

impl EsrsBank {
    async fn command(
        &self,
        account: AccountKey,
        command: AccountCommand,
    ) -> Result<(), CommandError> {
        let state = self
            .manager
            .lock_and_load(aggregate_id(account))
            .await
            .map_err(store_error)?
            .unwrap_or_default();
        self.manager
            .handle_command(state, command)
            .await
            .map_err(store_error)?
            .map_err(|e| CommandError::Other(e.into()))?;
        Ok(())
    }
}

#[async_trait]
impl Bank for EsrsBank {
    async fn open(&self, account: AccountKey) -> Result<(), CommandError> {
        self.command(account, AccountCommand::Open).await
    }

    async fn deposit(&self, account: AccountKey, amount: i64) -> Result<(), CommandError> {
        self.command(account, AccountCommand::Deposit(amount)).await
    }

    async fn load(&self, account: AccountKey) -> Result<Account> {
        let state = self
            .manager
            .load(aggregate_id(account))
            .await?
            .map(|s| s.into_inner())
            .unwrap_or_default();
        Ok(Account {
            balance: state.balance,
            events: state.events,
        })
    }

    async fn seed(&self, account: AccountKey, amounts: Vec<i64>) -> Result<()> {
        self.command(account, AccountCommand::DepositMany(amounts))
            .await
            .map_err(|e| anyhow!(e))
    }

    async fn stored_deposits(&self, account: AccountKey) -> Result<Vec<i64>> {
        let payloads: Vec<sqlx::types::Json<AccountEvent>> =
            sqlx::query_scalar("SELECT payload FROM account_events WHERE aggregate_id = $1")
                .bind(aggregate_id(account))
                .fetch_all(&self.pool)
                .await?;
        Ok(payloads
            .into_iter()
            .filter_map(|p| match p.0 {
                AccountEvent::Deposited { amount } => Some(amount),
                AccountEvent::Opened {} => None,
            })
            .collect())
    }
}
