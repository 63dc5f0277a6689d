//! `disintegrate` with `disintegrate-postgres`.
//!
//! Disintegrate has no aggregates: a decision names a state query (here: every event
//! with this `account_id`), the decision maker folds the matching events and appends the
//! new ones if no matching event was stored after the ones it read. The append runs in a
//! `SERIALIZABLE` transaction that takes advisory locks for its epoch and re-runs the
//! query with `SELECT EXISTS (...)`; a concurrent change surfaces as
//! `Error::Concurrency` or a serialization failure (`40001`), which the harness retries.
//! The event store has no per-stream sequence and writes no outbox row.

use std::sync::Arc;

use ::disintegrate::serde::json::Json;
use ::disintegrate::{
    BoxDynError, Decision, DecisionError, Event, EventSourcedStateStore, LoadState, NoSnapshot,
    StateMutate, StateQuery,
};
use ::disintegrate_postgres::{PgDecisionMaker, PgEventStore};
use anyhow::{anyhow, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::bank::{is_conflict, Account, AccountKey, Bank, CommandError, Framework};

/// The events.
#[derive(Clone, Debug, PartialEq, Eq, Event, Serialize, Deserialize)]
#[stream(AccountEvent, [AccountOpened, AmountDeposited])]
pub enum DomainEvent {
    /// The account was opened.
    AccountOpened {
        /// The account.
        #[id]
        account_id: i64,
    },
    /// Money was paid in.
    AmountDeposited {
        /// The account.
        #[id]
        account_id: i64,
        /// Minor units.
        amount: i64,
    },
}

/// The state a deposit is decided on: every event of the account.
#[derive(Clone, Debug, Default, StateQuery, Serialize, Deserialize)]
#[state_query(AccountEvent)]
pub struct AccountState {
    #[id]
    account_id: i64,
    opened: bool,
    balance: i64,
    events: u64,
}

impl AccountState {
    fn new(account_id: i64) -> Self {
        AccountState {
            account_id,
            ..AccountState::default()
        }
    }
}

impl StateMutate for AccountState {
    fn mutate(&mut self, event: Self::Event) {
        match event {
            AccountEvent::AccountOpened { .. } => self.opened = true,
            AccountEvent::AmountDeposited { amount, .. } => self.balance += amount,
        }
        self.events += 1;
    }
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

/// Opens an account.
struct OpenAccount(i64);

impl Decision for OpenAccount {
    type Event = DomainEvent;
    type StateQuery = AccountState;
    type Error = AccountError;

    fn state_query(&self) -> AccountState {
        AccountState::new(self.0)
    }

    fn process(&self, state: &AccountState) -> Result<Vec<DomainEvent>, AccountError> {
        if state.opened {
            return Err(AccountError("ACCOUNT_ALREADY_OPENED"));
        }
        Ok(vec![DomainEvent::AccountOpened { account_id: self.0 }])
    }
}

/// Deposits amounts, one event each (one amount for the benchmark, many for seeding).
struct Deposit {
    account_id: i64,
    amounts: Vec<i64>,
}

impl Decision for Deposit {
    type Event = DomainEvent;
    type StateQuery = AccountState;
    type Error = AccountError;

    fn state_query(&self) -> AccountState {
        AccountState::new(self.account_id)
    }

    fn process(&self, state: &AccountState) -> Result<Vec<DomainEvent>, AccountError> {
        self.amounts
            .iter()
            .map(|&amount| {
                check_deposit(state, amount)?;
                Ok(DomainEvent::AmountDeposited {
                    account_id: self.account_id,
                    amount,
                })
            })
            .collect()
    }
}

type Store = PgEventStore<DomainEvent, Json<DomainEvent>>;

/// What `Migrator::init_event_store` creates for [`DomainEvent`] (copied from
/// disintegrate-postgres 4.0.1's `src/event_store/sql/*.sql` and `add_domain_id_column`),
/// with `0xFFFFFFFF` written as `4294967295` so that PostgreSQL 15 accepts it.
const PG15_SCHEMA: &str = r"
CREATE SEQUENCE IF NOT EXISTS seq_event_event_id;
CREATE TABLE IF NOT EXISTS event (
    event_id BIGINT PRIMARY KEY DEFAULT nextval('seq_event_event_id'),
    event_type VARCHAR(255),
    payload BYTEA,
    inserted_at TIMESTAMP DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_event_type_btree ON event(event_type);
CREATE OR REPLACE FUNCTION event_store_current_epoch()
RETURNS BIGINT AS $$
DECLARE
    persisted_event_id BIGINT;
    pending_event_id BIGINT;
    db_id INT;
BEGIN
    SELECT COALESCE(MAX(event_id), 0) INTO persisted_event_id FROM event;
    SELECT oid INTO db_id FROM pg_database WHERE datname = current_database();

    SELECT MIN((l3.objid::bigint << 32) + l2.objid::bigint)
    INTO pending_event_id
    FROM pg_locks l1
    INNER JOIN pg_locks l2 ON l1.pid = l2.pid
    INNER JOIN pg_locks l3 ON l1.pid = l3.pid
    WHERE
        l1.classid = db_id
        AND l2.classid = 1
        AND l3.classid = 2
        AND l1.locktype = 'advisory';

    RETURN LEAST(COALESCE(pending_event_id, persisted_event_id), persisted_event_id);
END;
$$ LANGUAGE plpgsql;
CREATE OR REPLACE FUNCTION event_store_begin_epoch()
RETURNS void AS $$
DECLARE
    id BIGINT;
    db_id INT;
BEGIN
    SELECT last_value INTO id FROM seq_event_event_id;
    SELECT oid INTO db_id FROM pg_database WHERE datname = current_database();

    PERFORM pg_try_advisory_xact_lock_shared(db_id, 0);
    PERFORM pg_try_advisory_xact_lock_shared(1, (id & 4294967295)::bit(32)::integer);
    PERFORM pg_try_advisory_xact_lock_shared(2, (id >> 32)::bit(32)::integer);
END;
$$ LANGUAGE plpgsql;
ALTER TABLE event ADD COLUMN IF NOT EXISTS account_id BIGINT;
CREATE INDEX IF NOT EXISTS idx_event_account_id ON event (account_id) WHERE account_id IS NOT NULL;
";

/// `disintegrate` with `PgEventStore`.
#[derive(Clone, Copy, Debug)]
pub struct Disintegrate;

#[async_trait]
impl Framework for Disintegrate {
    fn name(&self) -> &'static str {
        "disintegrate"
    }

    fn database(&self) -> &'static str {
        "thalo_compare_disintegrate"
    }

    fn writes_outbox(&self) -> bool {
        false
    }

    async fn setup(&self, pool: &PgPool) -> Result<()> {
        let version: String = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(pool)
            .await?;
        if version.parse::<u32>()? >= 160_000 {
            // Its own migrator: the `event` table, the epoch functions and an
            // `account_id` column with its index.
            Store::try_new(pool.clone(), Json::default()).await?;
        } else {
            // disintegrate-postgres 4.0.1's `event_store_begin_epoch` uses the hexadecimal
            // literal `0xFFFFFFFF`, which PostgreSQL accepts from version 16 on; on 15
            // `try_new` fails with "trailing junk after numeric literal". Create the same
            // objects, with that literal written in decimal.
            sqlx::raw_sql(PG15_SCHEMA).execute(pool).await?;
        }
        Ok(())
    }

    async fn bind(&self, pool: PgPool) -> Result<Arc<dyn Bank>> {
        let store = Store::new_uninitialized(pool.clone(), Json::default());
        Ok(Arc::new(DisintegrateBank {
            decisions: ::disintegrate_postgres::decision_maker(store.clone(), NoSnapshot),
            states: EventSourcedStateStore::new(store, NoSnapshot),
            pool,
        }))
    }
}

struct DisintegrateBank {
    decisions: PgDecisionMaker<DomainEvent, Json<DomainEvent>, NoSnapshot>,
    states: EventSourcedStateStore<i64, DomainEvent, Store, NoSnapshot>,
    pool: PgPool,
}

fn account_id(account: AccountKey) -> Result<i64> {
    Ok(i64::try_from(account)?)
}

/// A concurrent append shows up as `Error::Concurrency` (a matching event was stored
/// after the ones read) or as a serialization failure of the `SERIALIZABLE` transaction.
fn map_error(err: DecisionError<AccountError>) -> CommandError {
    fn conflict(err: &BoxDynError) -> bool {
        match err.downcast_ref::<::disintegrate_postgres::Error>() {
            Some(::disintegrate_postgres::Error::Concurrency) => true,
            Some(::disintegrate_postgres::Error::Database(e)) => is_conflict(e),
            _ => false,
        }
    }
    match err {
        DecisionError::StateStore(e) | DecisionError::EventStore(e) if conflict(&e) => {
            CommandError::Conflict
        }
        other => CommandError::Other(anyhow!(other.to_string())),
    }
}

#[async_trait]
impl Bank for DisintegrateBank {
    async fn open(&self, account: AccountKey) -> Result<(), CommandError> {
        self.decisions
            .make(OpenAccount(account_id(account)?))
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn deposit(&self, account: AccountKey, amount: i64) -> Result<(), CommandError> {
        self.decisions
            .make(Deposit {
                account_id: account_id(account)?,
                amounts: vec![amount],
            })
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn load(&self, account: AccountKey) -> Result<Account> {
        let loaded = self
            .states
            .load(AccountState::new(account_id(account)?))
            .await
            .map_err(|e| anyhow!(e))?;
        let state = loaded.state();
        Ok(Account {
            balance: state.balance,
            events: state.events,
        })
    }

    async fn seed(&self, account: AccountKey, amounts: Vec<i64>) -> Result<()> {
        self.decisions
            .make(Deposit {
                account_id: account_id(account)?,
                amounts,
            })
            .await
            .map_err(|e| anyhow!(e.to_string()))?;
        Ok(())
    }

    async fn stored_deposits(&self, account: AccountKey) -> Result<Vec<i64>> {
        // `Json` stores the serde_json bytes of `DomainEvent` in a BYTEA column.
        let payloads: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT payload FROM event WHERE account_id = $1")
                .bind(account_id(account)?)
                .fetch_all(&self.pool)
                .await?;
        payloads
            .iter()
            .filter_map(|p| match serde_json::from_slice::<DomainEvent>(p) {
                Ok(DomainEvent::AmountDeposited { amount, .. }) => Some(Ok(amount)),
                Ok(DomainEvent::AccountOpened { .. }) => None,
                Err(e) => Some(Err(e.into())),
            })
            .collect()
    }
}
