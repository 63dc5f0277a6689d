use thalo::{commands, Aggregate, Error};

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

fn main() {}
