// Attributes on arguments move to the generated fields: `#[serde(default)]` lets payloads
// written before a field existed still decode, and `///` docs document the field.
use thalo::{commands, events, Aggregate, Error, Event};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    cents: i64,
    currency: String,
}

#[commands]
impl Account {
    pub fn open(
        &self,
        cents: i64,
        /// ISO 4217 code; EUR when missing.
        #[serde(default = "eur")]
        currency: String,
    ) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent { cents, currency })
    }
}

#[events]
impl Account {
    pub fn opened(&mut self, cents: i64, #[serde(default)] currency: String) {
        self.cents = cents;
        self.currency = currency;
    }
}

fn eur() -> String {
    "EUR".to_owned()
}

fn main() {
    let old = AccountEvent::decode("Opened", 1, r#"{"cents":3}"#).unwrap();
    assert_eq!(
        old,
        AccountEvent::Opened(OpenedEvent {
            cents: 3,
            currency: String::new()
        })
    );

    let command: AccountCommand =
        thalo::__private::serde_json::from_str(r#"{"Open":{"cents":3}}"#).unwrap();
    assert_eq!(
        command,
        AccountCommand::Open {
            cents: 3,
            currency: "EUR".to_owned()
        }
    );

    let mut account = Account::new("a".to_owned());
    for event in account.handle(command).unwrap() {
        account.apply(event);
    }
    assert_eq!(
        (
            account.id().as_str(),
            account.cents,
            account.currency.as_str()
        ),
        ("a", 3, "EUR")
    );
}
