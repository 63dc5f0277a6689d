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

fn main() {
    assert_eq!(BankAccount::TYPE, "bank_account");
    let mut account = BankAccount::new("acc-1".to_owned());
    let events = account
        .handle(BankAccountCommand::OpenAccount {
            initial_balance: 1.0,
        })
        .unwrap();
    for event in events {
        account.apply(event);
    }
    assert_eq!(
        (account.id().as_str(), account.balance, account.opened),
        ("acc-1", 1.0, true)
    );
    let err = account
        .handle(BankAccountCommand::OpenAccount {
            initial_balance: 1.0,
        })
        .unwrap_err();
    assert_eq!(err.code(), Some("ACCOUNT_ALREADY_OPENED"));
}
