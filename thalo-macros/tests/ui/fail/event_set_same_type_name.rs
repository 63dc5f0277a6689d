use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "account")]
pub struct Checking {
    #[identity]
    id: String,
}

#[commands]
impl Checking {
    pub fn open(&self) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent {})
    }
}

#[events]
impl Checking {
    pub fn opened(&mut self) {}
}

mod savings {
    use thalo::{commands, events, Aggregate, Error};

    #[derive(Aggregate, Clone, Debug, Default)]
    #[aggregate(name = "account")]
    pub struct Savings {
        #[identity]
        id: String,
    }

    #[commands]
    impl Savings {
        pub fn open(&self) -> Result<OpenedEvent, Error> {
            Ok(OpenedEvent {})
        }
    }

    #[events]
    impl Savings {
        pub fn opened(&mut self) {}
    }
}

// Both aggregates are stored as `account`: their events could not be told apart.
thalo::event_set! {
    pub enum AccountEvent {
        Checking(Checking),
        Savings(savings::Savings),
    }
}

fn main() {}
