use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
}

#[commands]
impl Account {
    pub fn open(&self) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent {})
    }
}

#[events]
impl Account {
    pub fn opened(&mut self) {}
}

pub struct Owner;

thalo::event_set! {
    pub enum OwnerEvent {
        Account(Account),
        Owner(Owner),
    }
}

fn main() {}
