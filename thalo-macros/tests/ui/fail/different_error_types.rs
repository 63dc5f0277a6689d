use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    cents: i64,
}

#[commands]
impl Account {
    pub fn deposit(&self, cents: i64) -> Result<DepositedEvent, Error> {
        Ok(DepositedEvent { cents })
    }

    pub fn withdraw(&self, cents: i64) -> Result<WithdrawnEvent, String> {
        Ok(WithdrawnEvent { cents })
    }
}

#[events]
impl Account {
    pub fn deposited(&mut self, cents: i64) {
        self.cents += cents;
    }

    pub fn withdrawn(&mut self, cents: i64) {
        self.cents -= cents;
    }
}

fn main() {}
