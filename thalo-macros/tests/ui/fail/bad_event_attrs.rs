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
}

#[events]
impl Account {
    #[event(version = 70000, colour = "red", upcast = upcast)]
    pub fn deposited(&mut self, cents: i64) {
        self.cents += cents;
    }

    #[event(name = "Deposited")]
    pub fn deposited_again(&mut self, cents: i64) {
        self.cents += cents;
    }

    #[event(name = "with space")]
    fn helper(&mut self) {}
}

fn upcast(
    _: u16,
    v: thalo::__private::serde_json::Value,
) -> Result<thalo::__private::serde_json::Value, Error> {
    Ok(v)
}

fn main() {}
