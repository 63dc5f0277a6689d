//! The balances read model in Postgres, fed with exactly-once effects.

use std::sync::Arc;

use thalo::{Error, EventEnvelope};
use thalo_postgres::sqlx::{self, PgConnection, PgPool, Row as _};
use thalo_postgres::{PgEventStore, PgProjection, SchemaName};

use crate::balances::AccountBalance;
use crate::BankAccountEvent;

/// The read model's SQL, with the table qualified by the store's validated schema.
#[derive(Debug)]
struct Sql {
    create_table: String,
    open: String,
    add: String,
    subtract: String,
    close: String,
    select_all: String,
    select_one: String,
}

/// The BIGINT range, for clamping.
const MIN: i64 = i64::MIN;
const MAX: i64 = i64::MAX;

impl Sql {
    fn new(schema: &SchemaName) -> Self {
        // The only string building: a schema name validated by `SchemaName`; every
        // value is a bound parameter.
        let table = schema.qualify("bank_balances");
        Sql {
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                    account_number TEXT PRIMARY KEY,
                    owner          TEXT NOT NULL,
                    balance        BIGINT NOT NULL,
                    closed         BOOLEAN NOT NULL DEFAULT false,
                    version        BIGINT NOT NULL,
                    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
                )"
            ),
            open: format!(
                "INSERT INTO {table} (account_number, owner, balance, version)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (account_number) DO UPDATE
                 SET owner = EXCLUDED.owner, balance = EXCLUDED.balance,
                     version = EXCLUDED.version, updated_at = now()"
            ),
            // Checked arithmetic, saturating like `BankAccount::apply` (in `numeric`, then
            // clamped to the BIGINT range), so the row is always the fold of the events
            // and an event can never fail the projection with "bigint out of range".
            add: format!(
                "UPDATE {table}
                 SET balance = LEAST(GREATEST(balance::numeric + $2::numeric, {MIN}), {MAX})::bigint,
                     version = $3, updated_at = now()
                 WHERE account_number = $1"
            ),
            subtract: format!(
                "UPDATE {table}
                 SET balance = LEAST(GREATEST(balance::numeric - $2::numeric, {MIN}), {MAX})::bigint,
                     version = $3, updated_at = now()
                 WHERE account_number = $1"
            ),
            close: format!(
                "UPDATE {table} SET closed = true, version = $2, updated_at = now()
                 WHERE account_number = $1"
            ),
            select_all: format!(
                "SELECT account_number, owner, balance, closed, version
                 FROM {table} ORDER BY account_number"
            ),
            select_one: format!(
                "SELECT account_number, owner, balance, closed, version
                 FROM {table} WHERE account_number = $1"
            ),
        }
    }
}

/// The `bank_balances` table, kept by a [`PgProjection`]: every change commits in the
/// same transaction as the projection's checkpoint, so each event counts exactly once.
#[derive(Clone, Debug)]
pub struct PgBalances {
    pool: PgPool,
    sql: Arc<Sql>,
}

impl PgBalances {
    /// The `bank_balances` table in the store's schema, created if needed.
    ///
    /// # Errors
    ///
    /// Returns the database error.
    pub async fn new(store: &PgEventStore) -> Result<Self, Error> {
        let sql = Arc::new(Sql::new(store.schema()));
        let pool = store.pool().clone();
        sqlx::query(&sql.create_table)
            .execute(&pool)
            .await
            .map_err(|e| Error::store("creating bank_balances", e))?;
        Ok(PgBalances { pool, sql })
    }

    /// Every account, by account number.
    ///
    /// # Errors
    ///
    /// Returns the database error.
    pub async fn all(&self) -> Result<Vec<AccountBalance>, Error> {
        let rows = sqlx::query(&self.sql.select_all)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| Error::store("reading bank_balances", e))?;
        rows.iter().map(to_balance).collect()
    }

    /// One account, if the projection has seen it.
    ///
    /// # Errors
    ///
    /// Returns the database error.
    pub async fn get(&self, account_number: &str) -> Result<Option<AccountBalance>, Error> {
        let row = sqlx::query(&self.sql.select_one)
            .bind(account_number)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| Error::store("reading bank_balances", e))?;
        row.as_ref().map(to_balance).transpose()
    }
}

fn to_balance(row: &sqlx::postgres::PgRow) -> Result<AccountBalance, Error> {
    let get = || -> Result<AccountBalance, sqlx::Error> {
        Ok(AccountBalance {
            account_number: row.try_get("account_number")?,
            owner: row.try_get("owner")?,
            balance: row.try_get("balance")?,
            closed: row.try_get("closed")?,
            version: u64::try_from(row.try_get::<i64, _>("version")?).unwrap_or(0),
        })
    };
    get().map_err(|e| Error::store("decoding bank_balances", e))
}

impl PgProjection<BankAccountEvent> for PgBalances {
    fn name(&self) -> &str {
        "bank_balances"
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope<BankAccountEvent>,
    ) -> Result<(), Error> {
        let id = &envelope.aggregate_id;
        let version = i64::try_from(envelope.sequence).unwrap_or(i64::MAX);
        let query = match &envelope.event {
            BankAccountEvent::AccountOpened(e) => sqlx::query(&self.sql.open)
                .bind(id)
                .bind(&e.owner)
                .bind(e.initial_deposit)
                .bind(version),
            BankAccountEvent::FundsDeposited(e) => sqlx::query(&self.sql.add)
                .bind(id)
                .bind(e.amount)
                .bind(version),
            BankAccountEvent::FundsWithdrawn(e) => sqlx::query(&self.sql.subtract)
                .bind(id)
                .bind(e.amount)
                .bind(version),
            BankAccountEvent::AccountClosed(_) => {
                sqlx::query(&self.sql.close).bind(id).bind(version)
            }
        };
        query
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::store("updating bank_balances", e))?;
        Ok(())
    }
}
