// An error type that is not a `std::error::Error` is reported on the command's return
// type, with what to do.
use thalo::{commands, events, Aggregate};

#[derive(Debug)]
pub struct AccountError;

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    cents: i64,
}

#[commands]
impl Account {
    pub fn deposit(&self, cents: i64) -> Result<DepositedEvent, AccountError> {
        Ok(DepositedEvent { cents })
    }
}

#[events]
impl Account {
    pub fn deposited(&mut self, cents: i64) {
        self.cents += cents;
    }
}

fn main() {}
