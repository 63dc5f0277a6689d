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

// Variants hold an aggregate type: `Account(Account)`, not a struct variant.
thalo::event_set! {
    pub enum OwnerEvent {
        Account { account: Account },
    }
}

fn main() {}
