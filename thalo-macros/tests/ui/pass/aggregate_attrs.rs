// `#[aggregate(name = "...", snapshot)]`: a custom type name, and snapshots through serde.
use serde::{Deserialize, Serialize};
use thalo::{commands, events, Aggregate, AggregateType, Error};

#[derive(Aggregate, Clone, Debug, Default, Serialize, Deserialize)]
#[aggregate(name = "shop.account-v2", snapshot)]
pub struct Account {
    #[identity]
    id: u64,
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
    pub fn deposited(&mut self, cents: i64) {
        self.cents += cents;
    }
}

// Without `snapshot`, the trait's defaults apply.
#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(name = "plain")]
pub struct Plain {
    #[identity]
    id: u64,
}

#[commands]
impl Plain {
    pub fn touch(&self) -> Result<TouchedEvent, Error> {
        Ok(TouchedEvent {})
    }
}

#[events]
impl Plain {
    pub fn touched(&mut self) {}
}

fn main() {
    assert_eq!(Account::TYPE, "shop.account-v2");
    let mut account = Account::new(9);
    account.apply(DepositedEvent { cents: 12 }.into());
    let snapshot = account.to_snapshot().unwrap().unwrap();
    assert_eq!(snapshot, r#"{"id":9,"cents":12}"#);
    let restored = Account::from_snapshot(&snapshot).unwrap();
    assert_eq!((restored.id, restored.cents), (9, 12));
    assert!(Account::from_snapshot("[]").is_err());
    let _ = account
        .handle(AccountCommand::Deposit { cents: 1 })
        .unwrap();

    assert_eq!(Plain::TYPE, "plain");
    let plain = Plain::new(1);
    assert!(plain.to_snapshot().is_none());
    assert!(Plain::from_snapshot("{}").is_err());
    assert_eq!(plain.handle(PlainCommand::Touch).unwrap().len(), 1);
    assert_eq!(*plain.id(), 1);
}
