use thalo::{commands, events, Aggregate};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
}

#[commands]
impl Account {
    fn deposit(&self) {}
}

#[events]
impl Account {
    fn deposited(&mut self) {}
}

fn main() {}
