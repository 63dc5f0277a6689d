// The command methods share the aggregate's own error type: any `std::error::Error +
// Send + Sync + 'static` works as is, with no `From` impl.
use thalo::{commands, events, Aggregate};

#[derive(Debug, PartialEq)]
pub enum AccountError {
    InsufficientFunds { balance: i64, amount: i64 },
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::InsufficientFunds { balance, amount } => {
                write!(f, "cannot withdraw {amount} from {balance}")
            }
        }
    }
}

impl std::error::Error for AccountError {}

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Account {
    #[identity]
    id: String,
    cents: i64,
}

#[commands]
impl Account {
    pub fn deposit(&self, cents: i64) -> Result<DepositedEvent, AccountError> {
        Ok(DepositedEvent { cents })
    }

    pub fn withdraw(&self, cents: i64) -> Result<WithdrawnEvent, AccountError> {
        if cents > self.cents {
            return Err(AccountError::InsufficientFunds {
                balance: self.cents,
                amount: cents,
            });
        }
        Ok(WithdrawnEvent { cents })
    }
}

#[events]
impl Account {
    pub fn deposited(&mut self, cents: i64) {
        self.cents += cents;
    }

    pub fn withdrawn(&mut self, cents: i64) {
        self.cents -= cents;
    }
}

fn main() {
    let mut account = Account::new("a".to_owned());
    for event in account
        .handle(AccountCommand::Deposit { cents: 5 })
        .unwrap()
    {
        account.apply(event);
    }
    let err: AccountError = account
        .handle(AccountCommand::Withdraw { cents: 7 })
        .unwrap_err();
    assert_eq!(
        err,
        AccountError::InsufficientFunds {
            balance: 5,
            amount: 7
        }
    );
    let err: thalo::Error = thalo::CommandError::into_error(err);
    assert!(err.downcast_domain::<AccountError>().is_some());
    // `AccountError` has no `thalo::ErrorCode`: `reject` gives no code either.
    let rejected = Account::reject(AccountError::InsufficientFunds {
        balance: 5,
        amount: 7,
    });
    assert_eq!(rejected.code(), None);
    assert!(rejected.downcast_domain::<AccountError>().is_some());
    assert_eq!(err.to_string(), "command rejected: cannot withdraw 7 from 5");
    assert_eq!(account.id(), "a");
}
