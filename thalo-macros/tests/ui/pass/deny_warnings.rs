//! The generated code is warning-free and documented, in a module that is public.
#![deny(
    warnings,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms
)]

/// A public module, so `missing_docs` checks what the macros generate.
pub mod bank {
    use thalo::{commands, events, Aggregate, Error};

    /// A bank account.
    #[derive(Aggregate, Clone, Debug, Default)]
    #[aggregate(name = "account")]
    pub struct Account {
        #[identity]
        id: String,
        cents: i64,
        open: bool,
        notes: Vec<String>,
    }

    #[commands]
    impl Account {
        /// Opens the account.
        pub fn open(&self, cents: i64) -> Result<OpenedEvent, Error> {
            self.check_closed()?;
            Ok(OpenedEvent { cents })
        }

        /// Closes the account.
        pub fn close(&self) -> Result<Option<ClosedEvent>, Error> {
            Ok(self.open.then_some(ClosedEvent {}))
        }

        /// Adds a note (its argument has no docs).
        pub fn undocumented(&self, note: String) -> Result<Vec<NotedEvent>, Error> {
            Ok(vec![NotedEvent { note }])
        }

        fn check_closed(&self) -> Result<(), Error> {
            if self.open {
                return Err(Error::invariant_code("ALREADY_OPEN"));
            }
            Ok(())
        }
    }

    #[events]
    impl Account {
        /// The account was opened.
        pub fn opened(&mut self, cents: i64) {
            self.cents = cents;
            self.open = true;
        }

        /// The account was closed.
        pub fn closed(&mut self) {
            self.open = false;
        }

        /// A note was added.
        pub fn noted(&mut self, note: String) {
            self.notes.push(note);
        }
    }

    impl Account {
        /// The balance.
        pub fn cents(&self) -> i64 {
            self.cents
        }

        /// The notes.
        pub fn notes(&self) -> &[String] {
            &self.notes
        }
    }
}

fn main() {
    use thalo::Aggregate;

    let mut account = bank::Account::new("a".to_owned());
    let note = "hi".to_owned();
    for command in [
        bank::AccountCommand::Open { cents: 1 },
        bank::AccountCommand::Undocumented { note },
    ] {
        for event in account.handle(command).unwrap() {
            account.apply(event);
        }
    }
    assert_eq!(
        (
            account.id().as_str(),
            account.cents(),
            account.notes().len()
        ),
        ("a", 1, 1)
    );
}
