//! `cqrs-es` with its Postgres repository, `postgres-es`.
//!
//! `CqrsFramework::execute` loads the aggregate (`SELECT` of the stream), runs the
//! command and commits the events with one `INSERT` per event in a transaction. It
//! writes no outbox row, and it does not retry a conflict: it returns
//! `AggregateError::AggregateConflict` (a unique violation on the primary key
//! `(aggregate_type, aggregate_id, sequence)`), and the harness runs the command again.

use std::sync::Arc;

use ::cqrs_es::event_sink::EventSink;
use ::cqrs_es::persist::PersistedEventStore;
use ::cqrs_es::{AggregateError, DomainEvent, EventStore};
use ::postgres_es::{postgres_cqrs, PostgresCqrs, PostgresEventRepository};
use anyhow::{anyhow, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::bank::{Account, AccountKey, Bank, CommandError, Framework};

/// The tables from `postgres-es`'s `db/init.sql` (the crate ships no migrations).
const SCHEMA: &str = r"
CREATE TABLE events (
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots (
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
";

/// The bank account.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CqrsAccount {
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

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        match self {
            AccountEvent::Opened {} => "Opened".into(),
            AccountEvent::Deposited { .. } => "Deposited".into(),
        }
    }

    fn event_version(&self) -> String {
        "1".into()
    }
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

impl CqrsAccount {
    fn check_deposit(&self, amount: i64) -> Result<(), AccountError> {
        if !self.opened {
            return Err(AccountError("ACCOUNT_NOT_OPEN"));
        }
        if amount <= 0 {
            return Err(AccountError("NON_POSITIVE_AMOUNT"));
        }
        Ok(())
    }
}

impl ::cqrs_es::Aggregate for CqrsAccount {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AccountCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AccountError> {
        match command {
            AccountCommand::Open => {
                if self.opened {
                    return Err(AccountError("ACCOUNT_ALREADY_OPENED"));
                }
                sink.write(AccountEvent::Opened {}, self).await;
            }
            AccountCommand::Deposit(amount) => {
                self.check_deposit(amount)?;
                sink.write(AccountEvent::Deposited { amount }, self).await;
            }
            AccountCommand::DepositMany(amounts) => {
                for amount in amounts {
                    self.check_deposit(amount)?;
                    sink.write(AccountEvent::Deposited { amount }, self).await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: AccountEvent) {
        match event {
            AccountEvent::Opened {} => self.opened = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
        }
        self.events += 1;
    }
}

/// `cqrs-es` + `postgres-es`.
#[derive(Clone, Copy, Debug)]
pub struct CqrsEs;

#[async_trait]
impl Framework for CqrsEs {
    fn name(&self) -> &'static str {
        "cqrs-es"
    }

    fn database(&self) -> &'static str {
        "thalo_compare_cqrs_es"
    }

    fn writes_outbox(&self) -> bool {
        false
    }

    async fn setup(&self, pool: &PgPool) -> Result<()> {
        sqlx::raw_sql(SCHEMA).execute(pool).await?;
        Ok(())
    }

    async fn bind(&self, pool: PgPool) -> Result<Arc<dyn Bank>> {
        Ok(Arc::new(CqrsBank {
            cqrs: postgres_cqrs(pool.clone(), Vec::new(), ()),
            // Only for `load`: the framework keeps its own store private.
            store: PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone())),
            pool,
        }))
    }
}

struct CqrsBank {
    cqrs: PostgresCqrs<CqrsAccount>,
    store: PersistedEventStore<PostgresEventRepository, CqrsAccount>,
    pool: PgPool,
}

fn aggregate_id(account: AccountKey) -> String {
    format!("acc-{account}")
}

fn map_error(err: AggregateError<AccountError>) -> CommandError {
    match err {
        AggregateError::AggregateConflict => CommandError::Conflict,
        other => CommandError::Other(anyhow!(other.to_string())),
    }
}

#[async_trait]
impl Bank for CqrsBank {
    async fn open(&self, account: AccountKey) -> Result<(), CommandError> {
        self.cqrs
            .execute(&aggregate_id(account), AccountCommand::Open)
            .await
            .map_err(map_error)
    }

    async fn deposit(&self, account: AccountKey, amount: i64) -> Result<(), CommandError> {
        self.cqrs
            .execute(&aggregate_id(account), AccountCommand::Deposit(amount))
            .await
            .map_err(map_error)
    }

    async fn load(&self, account: AccountKey) -> Result<Account> {
        let context = self
            .store
            .load_aggregate(&aggregate_id(account))
            .await
            .map_err(|e| anyhow!(e.to_string()))?;
        Ok(Account {
            balance: context.aggregate.balance,
            events: context.aggregate.events,
        })
    }

    async fn seed(&self, account: AccountKey, amounts: Vec<i64>) -> Result<()> {
        self.cqrs
            .execute(&aggregate_id(account), AccountCommand::DepositMany(amounts))
            .await
            .map_err(|e| anyhow!(e.to_string()))
    }

    async fn stored_deposits(&self, account: AccountKey) -> Result<Vec<i64>> {
        let payloads: Vec<sqlx::types::Json<AccountEvent>> = sqlx::query_scalar(
            "SELECT payload FROM events WHERE aggregate_type = 'account' AND aggregate_id = $1",
        )
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
