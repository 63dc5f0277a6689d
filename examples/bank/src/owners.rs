//! Balances by owner: a multi-stream projection over accounts and transfers, in
//! Postgres, fed by `PgSubscription::new_set` with exactly-once effects.
//!
//! An owner's `balance` is the sum of their accounts' balances; `in_flight` is the money
//! transfers have withdrawn from their accounts and neither deposited nor refunded yet.
//! The account events say whose money moved (through the account's owner, from its
//! `AccountOpened`); a transfer's `TransferRequested` says which account a deposit's
//! money came from, so the deposit takes it off the sender's `in_flight`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thalo::{Error, EventEnvelope, ResultExt as _};
use thalo_postgres::sqlx::{self, PgConnection, PgPool, Row as _};
use thalo_postgres::{PgEventStore, PgProjection};

use crate::transfer::{MoneyEvent, TransferEvent};
use crate::BankAccountEvent;

/// One owner's row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerBalance {
    /// The owner's name.
    pub owner: String,
    /// Cents, across the owner's accounts.
    pub balance: i64,
    /// Cents withdrawn by transfers from the owner's accounts, not yet deposited or
    /// refunded.
    pub in_flight: i64,
    /// How many of the owner's accounts are open.
    pub accounts: i64,
}

#[derive(Debug)]
struct Sql {
    create: Vec<String>,
    open: [String; 2],
    close: String,
    balance: String,
    in_flight_of_account: String,
    in_flight_of_transfer: String,
    requested: String,
    finished: String,
    select: String,
}

impl Sql {
    fn new(store: &PgEventStore) -> Self {
        // Names from the validated schema; every value is a bound parameter.
        let schema = store.schema();
        let owners = schema.qualify("bank_owners");
        let accounts = schema.qualify("bank_owner_accounts");
        let transfers = schema.qualify("bank_owner_transfers");
        Sql {
            create: vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {owners} (
                        owner     TEXT PRIMARY KEY,
                        balance   BIGINT NOT NULL DEFAULT 0,
                        in_flight BIGINT NOT NULL DEFAULT 0,
                        accounts  BIGINT NOT NULL DEFAULT 0
                    )"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {accounts} (
                        account_number TEXT PRIMARY KEY,
                        owner          TEXT NOT NULL
                    )"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {transfers} (
                        transfer     TEXT PRIMARY KEY,
                        from_account TEXT NOT NULL
                    )"
                ),
            ],
            open: [
                format!(
                    "INSERT INTO {accounts} (account_number, owner) VALUES ($1, $2)
                     ON CONFLICT (account_number) DO NOTHING"
                ),
                format!(
                    "INSERT INTO {owners} (owner, balance, accounts) VALUES ($1, $2, 1)
                     ON CONFLICT (owner) DO UPDATE
                     SET balance = {owners}.balance + EXCLUDED.balance,
                         accounts = {owners}.accounts + 1"
                ),
            ],
            close: format!(
                "UPDATE {owners} o SET accounts = o.accounts - 1
                 FROM {accounts} a WHERE a.account_number = $1 AND o.owner = a.owner"
            ),
            balance: format!(
                "UPDATE {owners} o SET balance = o.balance + $2
                 FROM {accounts} a WHERE a.account_number = $1 AND o.owner = a.owner"
            ),
            in_flight_of_account: format!(
                "UPDATE {owners} o SET in_flight = o.in_flight + $2
                 FROM {accounts} a WHERE a.account_number = $1 AND o.owner = a.owner"
            ),
            in_flight_of_transfer: format!(
                "UPDATE {owners} o SET in_flight = o.in_flight + $2
                 FROM {transfers} t JOIN {accounts} a ON a.account_number = t.from_account
                 WHERE t.transfer = $1 AND o.owner = a.owner"
            ),
            requested: format!(
                "INSERT INTO {transfers} (transfer, from_account) VALUES ($1, $2)
                 ON CONFLICT (transfer) DO NOTHING"
            ),
            finished: format!("DELETE FROM {transfers} WHERE transfer = $1"),
            select: format!(
                "SELECT owner, balance, in_flight, accounts FROM {owners} WHERE owner = $1"
            ),
        }
    }
}

/// The `bank_owners` read model (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct PgOwners {
    pool: PgPool,
    sql: Arc<Sql>,
}

impl PgOwners {
    /// The read model in the store's schema, its tables created if needed.
    ///
    /// # Errors
    ///
    /// Returns the database error.
    pub async fn new(store: &PgEventStore) -> Result<Self, Error> {
        let sql = Arc::new(Sql::new(store));
        let pool = store.pool().clone();
        for create in &sql.create {
            sqlx::query(create)
                .execute(&pool)
                .await
                .store_err("creating bank_owners")?;
        }
        Ok(PgOwners { pool, sql })
    }

    /// One owner, if the projection has seen one of their accounts.
    ///
    /// # Errors
    ///
    /// Returns the database error.
    pub async fn get(&self, owner: &str) -> Result<Option<OwnerBalance>, Error> {
        let row = sqlx::query(&self.sql.select)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await
            .store_err("reading bank_owners")?;
        row.map(|row| {
            Ok::<_, sqlx::Error>(OwnerBalance {
                owner: row.try_get("owner")?,
                balance: row.try_get("balance")?,
                in_flight: row.try_get("in_flight")?,
                accounts: row.try_get("accounts")?,
            })
        })
        .transpose()
        .store_err("decoding bank_owners")
    }

    async fn run(
        &self,
        tx: &mut PgConnection,
        sql: &str,
        key: &str,
        value: i64,
    ) -> Result<(), Error> {
        sqlx::query(sql)
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await
            .store_err("updating bank_owners")?;
        Ok(())
    }
}

impl PgProjection<MoneyEvent> for PgOwners {
    fn name(&self) -> &str {
        "bank_owners"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<MoneyEvent>,
    ) -> Result<(), Error> {
        let id = envelope.aggregate_id.as_str();
        let sql = &self.sql;
        match &envelope.event {
            MoneyEvent::BankAccount(event) => match event {
                BankAccountEvent::AccountOpened(e) => {
                    sqlx::query(&sql.open[0])
                        .bind(id)
                        .bind(&e.owner)
                        .execute(&mut *tx)
                        .await
                        .store_err("updating bank_owners")?;
                    self.run(tx, &sql.open[1], &e.owner, e.initial_deposit)
                        .await?;
                }
                BankAccountEvent::FundsDeposited(e) => {
                    self.run(tx, &sql.balance, id, e.amount).await?;
                }
                BankAccountEvent::FundsWithdrawn(e) => {
                    self.run(tx, &sql.balance, id, -e.amount).await?;
                }
                BankAccountEvent::AccountClosed(_) => {
                    sqlx::query(&sql.close)
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .store_err("updating bank_owners")?;
                }
                BankAccountEvent::TransferWithdrawn(e) => {
                    self.run(tx, &sql.balance, id, -e.amount).await?;
                    self.run(tx, &sql.in_flight_of_account, id, e.amount)
                        .await?;
                }
                BankAccountEvent::TransferDeposited(e) => {
                    self.run(tx, &sql.balance, id, e.amount).await?;
                    self.run(tx, &sql.in_flight_of_transfer, &e.transfer, -e.amount)
                        .await?;
                }
                BankAccountEvent::TransferRefunded(e) => {
                    self.run(tx, &sql.balance, id, e.amount).await?;
                    self.run(tx, &sql.in_flight_of_account, id, -e.amount)
                        .await?;
                }
            },
            MoneyEvent::Transfer(TransferEvent::TransferRequested(e)) => {
                sqlx::query(&sql.requested)
                    .bind(id)
                    .bind(&e.from)
                    .execute(&mut *tx)
                    .await
                    .store_err("updating bank_owners")?;
            }
            MoneyEvent::Transfer(
                TransferEvent::TransferCompleted(_)
                | TransferEvent::TransferCompensated(_)
                | TransferEvent::TransferFailed(_),
            ) => {
                sqlx::query(&sql.finished)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .store_err("updating bank_owners")?;
            }
            MoneyEvent::Transfer(
                TransferEvent::TransferMoneyWithdrawn(_) | TransferEvent::TransferTimedOut(_),
            ) => {}
        }
        Ok(())
    }
}
