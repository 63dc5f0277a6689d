use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    id: String,
    cents: i64,
}

#[commands]
impl Account {
    pub fn deposit(&self, cents: i64) -> Result<DepositedEvent, Error> {
        Ok(DepositedEvent { cents })
    }
}

#[events]
impl Account {
    pub fn deposited(&mut self, cents: i64) {
        self.cents += cents;
    }
}

fn main() {
    // Uses of the aggregate do not add errors of their own.
    let account = Account::new("a".to_owned());
    let _ = account.handle(AccountCommand::Deposit { cents: 1 });
}
