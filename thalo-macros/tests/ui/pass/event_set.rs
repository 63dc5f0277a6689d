//! `event_set!` under `deny(warnings, missing_docs)`: documented and undocumented
//! variants, extra derives, paths to aggregates in other modules, a private enum, a
//! trailing comma or none. (`thalo-macros/tests/ui` holds the compile tests of
//! `thalo::event_set!` too: it is a `macro_rules!` macro of `thalo`, checked here with
//! the other macros the way users call them.)
#![deny(warnings, missing_docs)]

use thalo::{Event, EventSet};

mod account {
    use thalo::{commands, events, Aggregate, Error};

    /// An account.
    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Account {
        #[identity]
        id: String,
    }

    #[commands]
    impl Account {
        /// Opens it.
        pub fn open(&self, owner: String) -> Result<OpenedEvent, Error> {
            Ok(OpenedEvent { owner })
        }
    }

    #[events]
    impl Account {
        /// Opened.
        pub fn opened(&mut self, owner: String) {
            let _ = owner;
        }
    }
}

mod card {
    use thalo::{commands, events, Aggregate, Error};

    /// A card.
    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Card {
        #[identity]
        id: String,
    }

    #[commands]
    impl Card {
        /// Issues it.
        pub fn issue(&self, owner: String) -> Result<OpenedEvent, Error> {
            Ok(OpenedEvent { owner })
        }
    }

    #[events]
    impl Card {
        /// Issued, stored as `Opened` like the account's.
        pub fn opened(&mut self, owner: String) {
            let _ = owner;
        }
    }
}

thalo::event_set! {
    /// Accounts and cards.
    #[derive(PartialEq)]
    pub enum OwnerEvent {
        /// An account's.
        Account(account::Account),
        Card(crate::card::Card),
    }
}

thalo::event_set! {
    /// Only accounts, no trailing comma.
    enum Accounts { Account(account::Account) }
}

fn main() {
    assert_eq!(OwnerEvent::aggregate_types(), ["account", "card"]);
    let event = OwnerEvent::decode_from("card", "Opened", 1, r#"{"owner":"ada"}"#).unwrap();
    assert_eq!(
        event,
        OwnerEvent::Card(card::CardEvent::Opened(card::OpenedEvent { owner: "ada".into() }))
    );
    assert_eq!(event.encode().unwrap(), r#"{"owner":"ada"}"#);
    let accounts = Accounts::from(account::AccountEvent::Opened(account::OpenedEvent {
        owner: "bo".into(),
    }));
    assert_eq!(accounts.event_type(), "Opened");
    assert_eq!(Accounts::aggregate_types(), ["account"]);
}
