//! The balances read model in Postgres, fed with exactly-once effects.

use std::sync::Arc;

use thalo::{Error, EventEnvelope, ResultExt as _};
use thalo_postgres::sqlx::{self, PgConnection, PgPool, Row as _};
use thalo_postgres::{PgEventStore, PgProjection, ReadModelTable};

use crate::balances::AccountBalance;
use crate::BankAccountEvent;

/// The read model's version this build writes by default. Bump it when the read model
/// changes: `bank serve` then builds the new version beside the live one and switches
/// reads over once it has caught up (see [`thalo_postgres::ReadModelTable`]).
pub const BALANCES_VERSION: u32 = 1;

/// The read model's SQL: writes go to the version's table, reads to the view that points
/// at the live version's table.
#[derive(Debug)]
struct Sql {
    table: ReadModelTable,
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
    fn new(read_model: ReadModelTable) -> Self {
        // The only string building: names validated by `ReadModelTable` (and its
        // `SchemaName`); every value is a bound parameter.
        let table = read_model.table().to_owned();
        let view = read_model.view().to_owned();
        Sql {
            table: read_model,
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
            // Named columns: a later version may add columns without breaking the
            // statements readers have prepared.
            select_all: format!(
                "SELECT account_number, owner, balance, closed, version
                 FROM {view} ORDER BY account_number"
            ),
            select_one: format!(
                "SELECT account_number, owner, balance, closed, version
                 FROM {view} WHERE account_number = $1"
            ),
        }
    }
}

/// The `bank_balances` read model, kept by a [`PgProjection`]: every change commits in
/// the same transaction as the projection's checkpoint, so each event counts exactly
/// once. Version N writes the table `bank_balances_vN`; reads go through the view
/// `bank_balances`, which points at the live version's table.
#[derive(Clone, Debug)]
pub struct PgBalances {
    pool: PgPool,
    sql: Arc<Sql>,
}

impl PgBalances {
    /// The read model's [`BALANCES_VERSION`] in the store's schema, its table created if
    /// needed.
    ///
    /// # Errors
    ///
    /// Returns the database error.
    pub async fn new(store: &PgEventStore) -> Result<Self, Error> {
        Self::with_version(store, BALANCES_VERSION).await
    }

    /// Version `version` of the read model (its table created if needed). A table
    /// `bank_balances` from before versions becomes version 1's table.
    ///
    /// # Errors
    ///
    /// Returns the database error, or [`Error::Config`] for version 0.
    pub async fn with_version(store: &PgEventStore, version: u32) -> Result<Self, Error> {
        let read_model = ReadModelTable::new(store.schema(), "bank_balances", version)?;
        let pool = store.pool().clone();
        // Before versions, the read model was the table `bank_balances` itself.
        let legacy: Option<String> = sqlx::query_scalar(
            "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = 'bank_balances'",
        )
        .bind(store.schema().as_str())
        .fetch_optional(&pool)
        .await
        .store_err("looking for the unversioned bank_balances")?;
        if legacy.as_deref() == Some("r") {
            let v1 = ReadModelTable::new(store.schema(), "bank_balances", 1)?;
            sqlx::query(&format!(
                "ALTER TABLE {} RENAME TO bank_balances_v1",
                v1.view()
            ))
            .execute(&pool)
            .await
            .store_err("renaming bank_balances to bank_balances_v1")?;
        }
        let sql = Arc::new(Sql::new(read_model));
        sqlx::query(&sql.create_table)
            .execute(&pool)
            .await
            .store_err("creating bank_balances")?;
        // Live at once when no version is (the view exists from the start); otherwise
        // building, until a subscription with this read model catches up.
        store
            .register_version("bank_balances", version, std::slice::from_ref(&sql.table))
            .await?;
        Ok(PgBalances { pool, sql })
    }

    /// The version this read model writes.
    pub fn version(&self) -> u32 {
        self.sql.table.version()
    }

    /// The read model's table for this version (and the view readers use), for
    /// [`PgSubscription::with_read_model`](thalo_postgres::PgSubscription::with_read_model).
    pub fn read_model(&self) -> ReadModelTable {
        self.sql.table.clone()
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
            .store_err("reading bank_balances")?;
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
            .store_err("reading bank_balances")?;
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
    get().store_err("decoding bank_balances")
}

impl PgProjection<BankAccountEvent> for PgBalances {
    fn name(&self) -> &str {
        "bank_balances"
    }

    fn version(&self) -> u32 {
        self.sql.table.version()
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
            BankAccountEvent::TransferWithdrawn(e) => sqlx::query(&self.sql.subtract)
                .bind(id)
                .bind(e.amount)
                .bind(version),
            BankAccountEvent::TransferDeposited(e) => sqlx::query(&self.sql.add)
                .bind(id)
                .bind(e.amount)
                .bind(version),
            BankAccountEvent::TransferRefunded(e) => sqlx::query(&self.sql.add)
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
            .store_err("updating bank_balances")?;
        Ok(())
    }
}
