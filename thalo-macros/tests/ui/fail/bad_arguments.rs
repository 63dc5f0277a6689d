use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    owner: String,
}

#[commands]
impl Account {
    pub fn open(&self, owner: &str, tags: impl Into<String>) -> Result<OpenedEvent, Error> {
        let _ = tags;
        Ok(OpenedEvent {
            owner: owner.to_owned(),
        })
    }

    pub fn rename(&self, Name(owner): Name) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent { owner })
    }
}

pub struct Name(String);

#[events]
impl Account {
    pub fn opened(&mut self, owner: String) {
        self.owner = owner;
    }
}

fn main() {}
