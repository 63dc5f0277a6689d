//! The README example from the architecture document, verbatim: the API contract of the
//! macros. Below it, tests of what it generates and how it behaves.

use thalo::{commands, events, Aggregate, AggregateType, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct BankAccount {
    #[identity]
    account_number: String,
    balance: f64,
    opened: bool,
}

#[commands]
impl BankAccount {
    /// Creates a command for opening an account
    pub fn open_account(&self, initial_balance: f64) -> Result<AccountOpenedEvent, Error> {
        if self.opened {
            return Err(Error::invariant_code("ACCOUNT_ALREADY_OPENED"));
        }
        Ok(AccountOpenedEvent { initial_balance })
    }
}

#[events]
impl BankAccount {
    /// Creates an event for when a user opened an account
    pub fn account_opened(&mut self, initial_balance: f64) {
        self.balance = initial_balance;
        self.opened = true;
    }
}

use thalo::Event;

#[test]
fn generated_types_have_the_documented_shape() {
    let BankAccountCommand::OpenAccount { initial_balance } = BankAccountCommand::OpenAccount {
        initial_balance: 1.5,
    };
    assert_eq!(initial_balance, 1.5);

    let event = BankAccountEvent::AccountOpened(AccountOpenedEvent {
        initial_balance: 2.5,
    });
    let BankAccountEvent::AccountOpened(AccountOpenedEvent { initial_balance }) = event;
    assert_eq!(initial_balance, 2.5);
}

#[test]
fn aggregate_type_is_snake_case_of_the_struct() {
    assert_eq!(<BankAccount as AggregateType>::TYPE, "bank_account");
}

#[test]
fn events_have_stable_names_and_round_trip_as_json() {
    let event = BankAccountEvent::from(AccountOpenedEvent {
        initial_balance: 10.0,
    });
    assert_eq!(event.event_type(), "AccountOpened");
    assert_eq!(event.event_version(), 1);
    assert_eq!(BankAccountEvent::event_types(), ["AccountOpened"]);

    let payload = event.encode().unwrap();
    assert_eq!(payload, r#"{"initial_balance":10.0}"#);
    let decoded = BankAccountEvent::decode("AccountOpened", 1, &payload).unwrap();
    assert_eq!(decoded, event);

    let err = BankAccountEvent::decode("AccountClosed", 1, "{}").unwrap_err();
    assert!(
        matches!(&err, Error::UnknownEventType { event_type, version: 1, target: "BankAccountEvent" } if event_type == "AccountClosed"),
        "{err:?}"
    );
}

#[test]
fn handle_and_apply() {
    let mut account = <BankAccount as Aggregate>::new("acc-1".to_owned());
    assert_eq!(account.id(), "acc-1");
    assert!(!account.opened);

    let events = Aggregate::handle(
        &account,
        BankAccountCommand::OpenAccount {
            initial_balance: 100.0,
        },
    )
    .unwrap();
    assert_eq!(
        events,
        [BankAccountEvent::AccountOpened(AccountOpenedEvent {
            initial_balance: 100.0
        })]
    );
    for event in events {
        Aggregate::apply(&mut account, event);
    }
    assert!(account.opened);
    assert_eq!(account.balance, 100.0);

    let err = Aggregate::handle(
        &account,
        BankAccountCommand::OpenAccount {
            initial_balance: 5.0,
        },
    )
    .unwrap_err();
    assert_eq!(err.code(), Some("ACCOUNT_ALREADY_OPENED"));
    // Handling never changes the aggregate.
    assert_eq!(account.balance, 100.0);
}
