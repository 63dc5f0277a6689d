use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    cents: i64,
}

#[commands]
impl Account {
    pub fn deposit(&mut self, cents: i64) -> Result<DepositedEvent, Error> {
        self.cents += cents;
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
    let _ = AccountCommand::Deposit { cents: 1 };
}
