//! The balances read model, kept in memory.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use thalo::{Error, EventEnvelope, EventHandler, Projection};

use crate::account::BankAccountEvent;

/// One row of the balances read model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountBalance {
    /// The account number.
    pub account_number: String,
    /// The owner's name.
    pub owner: String,
    /// Balance in cents.
    pub balance: i64,
    /// Whether the account is closed.
    pub closed: bool,
    /// Sequence of the last event applied, to skip redelivered events.
    pub version: u64,
}

/// Balances of every account, built from the events.
///
/// Events at or below an account's last applied sequence are skipped, so delivering an
/// event twice does not count it twice.
#[derive(Debug, Default)]
pub struct Balances {
    rows: Mutex<BTreeMap<String, AccountBalance>>,
}

impl Balances {
    /// All accounts, by account number.
    pub fn all(&self) -> Vec<AccountBalance> {
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// One account.
    pub fn get(&self, account_number: &str) -> Option<AccountBalance> {
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account_number)
            .cloned()
    }

    /// Applies one event to the read model (idempotent per sequence).
    pub fn apply(&self, envelope: &EventEnvelope<BankAccountEvent>) {
        let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let row = rows
            .entry(envelope.aggregate_id.clone())
            .or_insert_with(|| AccountBalance {
                account_number: envelope.aggregate_id.clone(),
                owner: String::new(),
                balance: 0,
                closed: false,
                version: 0,
            });
        if envelope.sequence <= row.version {
            return;
        }
        row.version = envelope.sequence;
        match &envelope.event {
            BankAccountEvent::AccountOpened(e) => {
                row.owner.clone_from(&e.owner);
                row.balance = e.initial_deposit;
            }
            BankAccountEvent::FundsDeposited(e) => row.balance += e.amount,
            BankAccountEvent::FundsWithdrawn(e) => row.balance -= e.amount,
            BankAccountEvent::TransferWithdrawn(e) => row.balance -= e.amount,
            BankAccountEvent::TransferDeposited(e) => row.balance += e.amount,
            BankAccountEvent::TransferRefunded(e) => row.balance += e.amount,
            BankAccountEvent::AccountClosed(_) => row.closed = true,
        }
    }
}

impl EventHandler<BankAccountEvent> for Balances {
    async fn handle(&self, envelope: &EventEnvelope<BankAccountEvent>) -> Result<(), Error> {
        self.apply(envelope);
        Ok(())
    }
}

impl Projection<BankAccountEvent> for Balances {
    fn name(&self) -> &str {
        "balances"
    }
}
