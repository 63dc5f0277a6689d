// `#[event(name, version, upcast)]`: stable names, schema versions and upcasting.
use thalo::__private::serde_json::{json, Value};
use thalo::{commands, events, Aggregate, Error, Event};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    owner: String,
    cents: i64,
    closed: bool,
}

#[commands]
impl Account {
    pub fn open(&self, owner: String, cents: i64) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent { owner, cents })
    }

    pub fn close(&self) -> Result<ClosedEvent, Error> {
        Ok(ClosedEvent {})
    }
}

#[events]
impl Account {
    /// Version 1 had `amount` instead of `cents`, and no owner.
    #[event(name = "AccountOpened", version = 3, upcast = upcasts::opened)]
    pub fn opened(&mut self, owner: String, cents: i64) {
        self.owner = owner;
        self.cents = cents;
    }

    #[event(version = 2, upcast = Self::upcast_closed)]
    #[event(name = "account.closed")]
    pub fn closed(&mut self) {
        self.closed = true;
    }
}

impl Account {
    fn upcast_closed(_version: u16, payload: Value) -> Result<Value, Error> {
        Ok(payload)
    }
}

mod upcasts {
    use super::*;

    pub fn opened(version: u16, mut payload: Value) -> Result<Value, Error> {
        if version == 1 {
            payload["cents"] = payload["amount"].take();
        }
        if version <= 2 {
            payload["owner"] = json!("unknown");
        }
        Ok(payload)
    }
}

fn main() {
    let event = AccountEvent::from(OpenedEvent {
        owner: "ada".into(),
        cents: 5,
    });
    assert_eq!(
        (event.event_type(), event.event_version()),
        ("AccountOpened", 3)
    );
    let closed = AccountEvent::from(ClosedEvent {});
    assert_eq!(
        (closed.event_type(), closed.event_version()),
        ("account.closed", 2)
    );
    assert_eq!(closed.encode().unwrap(), "{}");
    assert_eq!(
        AccountEvent::event_types(),
        ["AccountOpened", "account.closed"]
    );

    let v1 = AccountEvent::decode("AccountOpened", 1, r#"{"amount":7}"#).unwrap();
    assert_eq!(
        v1,
        AccountEvent::Opened(OpenedEvent {
            owner: "unknown".into(),
            cents: 7
        })
    );
    let v3 = AccountEvent::decode("AccountOpened", 3, &event.encode().unwrap()).unwrap();
    assert_eq!(v3, event);
    assert!(AccountEvent::decode("AccountOpened", 4, "{}").is_err());
    assert!(AccountEvent::decode("Opened", 3, "{}").is_err());
    assert_eq!(
        AccountEvent::decode("account.closed", 1, "{}").unwrap(),
        closed
    );

    let mut account = Account::new("a".into());
    for command in [
        AccountCommand::Open {
            owner: "ada".into(),
            cents: 1,
        },
        AccountCommand::Close,
    ] {
        for event in account.handle(command).unwrap() {
            account.apply(event);
        }
    }
    assert_eq!(
        (
            account.id().as_str(),
            account.owner.as_str(),
            account.cents,
            account.closed
        ),
        ("a", "ada", 1, true)
    );
}
