//! The physical limit: the SQL a deposit needs, written by hand with sqlx.
//!
//! The tables have the same shape as Thalo's (`thalo-postgres/migrations`): an `events`
//! table with a global position, the writer's transaction id, a unique
//! `(aggregate_type, aggregate_id, sequence)` constraint, and an `outbox` table. A
//! deposit reads the stream, folds it, checks the invariants and inserts the event and
//! its outbox row; a unique violation is a conflict.
//!
//! Two variants:
//! - [`Raw::Transaction`]: `BEGIN; SELECT stream; INSERT event; INSERT outbox; COMMIT`, one
//!   statement per round trip (5 round trips), which is what a straightforward framework
//!   does.
//! - [`Raw::Minimal`]: the fewest round trips that keep the same guarantees: the
//!   `SELECT` on its own, then one statement that inserts the event and its outbox row
//!   (a data-modifying CTE is atomic by itself), 2 round trips on one pooled connection.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::bank::{is_conflict, Account, AccountKey, Bank, CommandError, Framework};

const AGGREGATE_TYPE: &str = "account";

const SCHEMA: &str = r"
CREATE TABLE events (
    position        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id  XID8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id        UUID NOT NULL,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    sequence        BIGINT NOT NULL,
    event_type      TEXT NOT NULL,
    event_version   SMALLINT NOT NULL,
    payload         JSONB NOT NULL,
    metadata        JSONB NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL,
    CONSTRAINT events_stream_sequence UNIQUE (aggregate_type, aggregate_id, sequence)
);
CREATE INDEX events_global_order ON events (transaction_id, position);
CREATE TABLE outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    position        BIGINT NOT NULL
);
";

const SELECT_STREAM: &str = "SELECT sequence, event_type, payload::text AS payload FROM events \
     WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence";

const INSERT_EVENT: &str = "INSERT INTO events \
     (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, created_at) \
     VALUES ($1, $2, $3, $4, $5, 1, $6::jsonb, now()) RETURNING position";

const INSERT_OUTBOX: &str = "INSERT INTO outbox (position) VALUES ($1)";

const INSERT_EVENT_AND_OUTBOX: &str = "WITH e AS (INSERT INTO events \
     (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, created_at) \
     VALUES ($1, $2, $3, $4, $5, 1, $6::jsonb, now()) RETURNING position) \
     INSERT INTO outbox (position) SELECT position FROM e";

const INSERT_MANY: &str = "WITH e AS (INSERT INTO events \
     (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, created_at) \
     SELECT gen_random_uuid(), $1, $2, $3 + n, 'Deposited', 1, jsonb_build_object('amount', amount), now() \
     FROM unnest($4::bigint[]) WITH ORDINALITY AS t(amount, n) RETURNING position) \
     INSERT INTO outbox (position) SELECT position FROM e";

const SELECT_DEPOSITS: &str = "SELECT (payload->>'amount')::bigint FROM events \
     WHERE aggregate_type = $1 AND aggregate_id = $2 AND event_type = 'Deposited'";

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: i64,
}

/// Hand-written sqlx.
#[derive(Clone, Copy, Debug)]
pub enum Raw {
    /// One transaction, one round trip per statement.
    Transaction,
    /// `SELECT`, then one atomic statement for the event and its outbox row.
    Minimal,
}

#[async_trait]
impl Framework for Raw {
    fn name(&self) -> &'static str {
        match self {
            Raw::Transaction => "raw sqlx (1 tx)",
            Raw::Minimal => "raw sqlx (2 stmts)",
        }
    }

    fn database(&self) -> &'static str {
        match self {
            Raw::Transaction => "thalo_compare_raw_tx",
            Raw::Minimal => "thalo_compare_raw_min",
        }
    }

    fn writes_outbox(&self) -> bool {
        true
    }

    async fn setup(&self, pool: &PgPool) -> Result<()> {
        sqlx::raw_sql(SCHEMA).execute(pool).await?;
        Ok(())
    }

    async fn bind(&self, pool: PgPool) -> Result<Arc<dyn Bank>> {
        Ok(Arc::new(RawBank {
            pool,
            variant: *self,
        }))
    }
}

struct RawBank {
    pool: PgPool,
    variant: Raw,
}

fn aggregate_id(account: AccountKey) -> String {
    format!("acc-{account}")
}

/// Folds a stream read with [`SELECT_STREAM`].
fn fold(rows: &[sqlx::postgres::PgRow]) -> Result<(Account, bool)> {
    let mut account = Account::default();
    let mut opened = false;
    for row in rows {
        let event_type: &str = row.try_get("event_type")?;
        let payload: &str = row.try_get("payload")?;
        match event_type {
            "Opened" => {
                let Opened {} = serde_json::from_str(payload)?;
                opened = true;
            }
            "Deposited" => {
                let Deposited { amount } = serde_json::from_str(payload)?;
                account.balance += amount;
            }
            other => bail!("unknown event type {other}"),
        }
        account.events += 1;
    }
    Ok((account, opened))
}

impl RawBank {
    async fn command(
        &self,
        account: AccountKey,
        event_type: &str,
        payload: String,
        check: impl FnOnce(bool) -> Result<()> + Send,
    ) -> Result<(), CommandError> {
        let id = aggregate_id(account);
        let map = |e: sqlx::Error| {
            if is_conflict(&e) {
                CommandError::Conflict
            } else {
                CommandError::Other(e.into())
            }
        };
        match self.variant {
            Raw::Transaction => {
                let mut tx = self.pool.begin().await.map_err(map)?;
                let rows = sqlx::query(SELECT_STREAM)
                    .bind(AGGREGATE_TYPE)
                    .bind(&id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(map)?;
                let (state, opened) = fold(&rows)?;
                check(opened)?;
                let position: i64 = sqlx::query_scalar(INSERT_EVENT)
                    .bind(Uuid::now_v7())
                    .bind(AGGREGATE_TYPE)
                    .bind(&id)
                    .bind(i64::try_from(state.events + 1).context("sequence")?)
                    .bind(event_type)
                    .bind(payload)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(map)?;
                sqlx::query(INSERT_OUTBOX)
                    .bind(position)
                    .execute(&mut *tx)
                    .await
                    .map_err(map)?;
                tx.commit().await.map_err(map)?;
            }
            Raw::Minimal => {
                let mut conn = self.pool.acquire().await.map_err(map)?;
                let rows = sqlx::query(SELECT_STREAM)
                    .bind(AGGREGATE_TYPE)
                    .bind(&id)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(map)?;
                let (state, opened) = fold(&rows)?;
                check(opened)?;
                sqlx::query(INSERT_EVENT_AND_OUTBOX)
                    .bind(Uuid::now_v7())
                    .bind(AGGREGATE_TYPE)
                    .bind(&id)
                    .bind(i64::try_from(state.events + 1).context("sequence")?)
                    .bind(event_type)
                    .bind(payload)
                    .execute(&mut *conn)
                    .await
                    .map_err(map)?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Bank for RawBank {
    async fn open(&self, account: AccountKey) -> Result<(), CommandError> {
        let payload = serde_json::to_string(&Opened {}).map_err(anyhow::Error::from)?;
        self.command(account, "Opened", payload, |opened| {
            if opened {
                bail!("ACCOUNT_ALREADY_OPENED");
            }
            Ok(())
        })
        .await
    }

    async fn deposit(&self, account: AccountKey, amount: i64) -> Result<(), CommandError> {
        let payload = serde_json::to_string(&Deposited { amount }).map_err(anyhow::Error::from)?;
        self.command(account, "Deposited", payload, |opened| {
            if !opened {
                bail!("ACCOUNT_NOT_OPEN");
            }
            if amount <= 0 {
                bail!("NON_POSITIVE_AMOUNT");
            }
            Ok(())
        })
        .await
    }

    async fn load(&self, account: AccountKey) -> Result<Account> {
        let rows = sqlx::query(SELECT_STREAM)
            .bind(AGGREGATE_TYPE)
            .bind(aggregate_id(account))
            .fetch_all(&self.pool)
            .await?;
        Ok(fold(&rows)?.0)
    }

    async fn seed(&self, account: AccountKey, amounts: Vec<i64>) -> Result<()> {
        let current = self.load(account).await?;
        sqlx::query(INSERT_MANY)
            .bind(AGGREGATE_TYPE)
            .bind(aggregate_id(account))
            .bind(i64::try_from(current.events)?)
            .bind(amounts)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn stored_deposits(&self, account: AccountKey) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(SELECT_DEPOSITS)
            .bind(AGGREGATE_TYPE)
            .bind(aggregate_id(account))
            .fetch_all(&self.pool)
            .await?)
    }
}
