// Every mistake is reported in one compile, and nothing else: uses of the generated
// types in `main` add no errors.
use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
#[aggregate(snapshot = true)]
pub struct Account {
    id: String,
    cents: i64,
}

#[commands]
impl Account {
    pub fn deposit(&mut self, cents: i64) -> Result<DepositedEvent, Error> {
        Ok(DepositedEvent { cents })
    }

    pub async fn withdraw(&self, (cents, _note): (i64, String)) -> Result<WithdrawnEvent, Error> {
        Ok(WithdrawnEvent { cents })
    }

    pub fn close(&self) {}
}

#[events]
impl Account {
    #[event(version = 0, colour = "red")]
    pub fn deposited(&mut self, cents: i64) -> i64 {
        self.cents += cents;
        self.cents
    }

    #[event(name = "Deposited")]
    pub fn withdrawn(&self, cents: i64) {
        let _ = cents;
    }
}

fn main() {
    let account = Account::new("a".to_owned());
    let _ = account.handle(AccountCommand::Deposit { cents: 1 });
    let _ = AccountEvent::from(DepositedEvent { cents: 1 });
    let _ = AccountCommand::Close;
}
