use thalo::{commands, events, Aggregate};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    cents: i64,
}

#[commands]
impl Account {
    pub fn deposit(&self, cents: i64) -> u32 {
        cents as u32
    }
}

#[events]
impl Account {
    pub fn deposited(&mut self, cents: i64) {
        self.cents += cents;
    }
}

fn main() {}
