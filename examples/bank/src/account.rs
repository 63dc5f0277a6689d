//! The bank account aggregate.

use serde::{Deserialize, Serialize};
use thalo::{commands, events, Aggregate, Error};

/// Where an account is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// No `AccountOpened` yet.
    #[default]
    New,
    /// Open for deposits and withdrawals.
    Open,
    /// Closed for good.
    Closed,
}

/// A bank account. Balances are in cents.
#[derive(Aggregate, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[aggregate(snapshot)]
pub struct BankAccount {
    #[identity]
    account_number: String,
    owner: String,
    balance: i64,
    status: Status,
}

impl BankAccount {
    /// The account number.
    pub fn account_number(&self) -> &str {
        &self.account_number
    }

    /// The owner's name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The balance in cents.
    pub fn balance(&self) -> i64 {
        self.balance
    }

    /// The account's status.
    pub fn status(&self) -> Status {
        self.status
    }

    fn ensure_open(&self) -> Result<(), Error> {
        match self.status {
            Status::Open => Ok(()),
            Status::New => Err(Error::invariant_code("ACCOUNT_NOT_OPEN")),
            Status::Closed => Err(Error::invariant_code("ACCOUNT_CLOSED")),
        }
    }
}

/// The longest account number.
pub const MAX_ACCOUNT_NUMBER_LEN: usize = 64;

/// The longest owner name, in characters.
pub const MAX_OWNER_LEN: usize = 200;

/// Checks an account number: 1 to 64 ASCII letters, digits, `-` or `_`. The account
/// number is the aggregate's identity, so it is checked before any command runs.
///
/// # Errors
///
/// [`Error::Invariant`] with code `INVALID_ACCOUNT_NUMBER`.
pub fn validate_account_number(account_number: &str) -> Result<(), Error> {
    let valid = !account_number.is_empty()
        && account_number.len() <= MAX_ACCOUNT_NUMBER_LEN
        && account_number
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(Error::invariant(
            "INVALID_ACCOUNT_NUMBER",
            format!(
                "an account number is 1 to {MAX_ACCOUNT_NUMBER_LEN} ASCII letters, digits, `-` or `_`"
            ),
        ))
    }
}

fn validate_owner(owner: &str) -> Result<(), Error> {
    if owner.trim().is_empty() {
        return Err(Error::invariant(
            "INVALID_OWNER",
            "the owner's name is empty",
        ));
    }
    if owner.chars().count() > MAX_OWNER_LEN {
        return Err(Error::invariant(
            "INVALID_OWNER",
            format!("the owner's name is longer than {MAX_OWNER_LEN} characters"),
        ));
    }
    if owner.chars().any(char::is_control) {
        return Err(Error::invariant(
            "INVALID_OWNER",
            "the owner's name contains control characters",
        ));
    }
    Ok(())
}

fn ensure_positive(amount: i64) -> Result<(), Error> {
    if amount <= 0 {
        return Err(Error::invariant(
            "NON_POSITIVE_AMOUNT",
            format!("amounts must be positive, got {amount} cents"),
        ));
    }
    Ok(())
}

#[commands]
impl BankAccount {
    /// Opens the account for `owner` with an initial deposit (may be zero).
    pub fn open_account(
        &self,
        owner: String,
        initial_deposit: i64,
    ) -> Result<AccountOpenedEvent, Error> {
        if self.status != Status::New {
            return Err(Error::invariant_code("ACCOUNT_ALREADY_OPENED"));
        }
        if initial_deposit < 0 {
            return Err(Error::invariant(
                "NON_POSITIVE_AMOUNT",
                "the initial deposit cannot be negative",
            ));
        }
        validate_owner(&owner)?;
        Ok(AccountOpenedEvent {
            owner,
            initial_deposit,
        })
    }

    /// Deposits `amount` cents.
    pub fn deposit(&self, amount: i64) -> Result<FundsDepositedEvent, Error> {
        self.ensure_open()?;
        ensure_positive(amount)?;
        // Decided here, so that `apply` never has to: a balance that would not fit is
        // a rejected command, never a stored event.
        if self.balance.checked_add(amount).is_none() {
            return Err(Error::invariant(
                "BALANCE_OVERFLOW",
                format!(
                    "a deposit of {amount} cents would take the balance past {} cents",
                    i64::MAX
                ),
            ));
        }
        Ok(FundsDepositedEvent { amount })
    }

    /// Withdraws `amount` cents, if the balance covers it.
    pub fn withdraw(&self, amount: i64) -> Result<FundsWithdrawnEvent, Error> {
        self.ensure_open()?;
        ensure_positive(amount)?;
        if amount > self.balance {
            return Err(Error::invariant(
                "INSUFFICIENT_FUNDS",
                format!(
                    "balance is {} cents, withdrawal is {amount} cents",
                    self.balance
                ),
            ));
        }
        Ok(FundsWithdrawnEvent { amount })
    }

    /// Withdraws `amount` cents for the transfer `transfer` (its first leg), if the
    /// balance covers it.
    pub fn withdraw_for_transfer(
        &self,
        transfer: String,
        amount: i64,
    ) -> Result<TransferWithdrawnEvent, Error> {
        self.withdraw(amount)?;
        Ok(TransferWithdrawnEvent { transfer, amount })
    }

    /// Deposits `amount` cents of the transfer `transfer` (its second leg).
    pub fn deposit_for_transfer(
        &self,
        transfer: String,
        amount: i64,
    ) -> Result<TransferDepositedEvent, Error> {
        self.deposit(amount)?;
        Ok(TransferDepositedEvent { transfer, amount })
    }

    /// Pays back `amount` cents the transfer `transfer` withdrew and could not deposit.
    /// Accepted whatever the account's status: the money was this account's, and a
    /// refund that could be rejected would leave it nowhere.
    pub fn refund_transfer(
        &self,
        transfer: String,
        amount: i64,
    ) -> Result<TransferRefundedEvent, Error> {
        ensure_positive(amount)?;
        Ok(TransferRefundedEvent { transfer, amount })
    }

    /// Closes the account, paying out what is left.
    pub fn close_account(&self) -> Result<Vec<BankAccountEvent>, Error> {
        self.ensure_open()?;
        let mut events = Vec::new();
        if self.balance > 0 {
            events.push(
                FundsWithdrawnEvent {
                    amount: self.balance,
                }
                .into(),
            );
        }
        events.push(AccountClosedEvent {}.into());
        Ok(events)
    }
}

#[events]
impl BankAccount {
    /// The account was opened.
    pub fn account_opened(&mut self, owner: String, initial_deposit: i64) {
        self.owner = owner;
        self.balance = initial_deposit;
        self.status = Status::Open;
    }

    /// Money was paid in. `apply` must be total (it runs on every load, for every
    /// stored event): the command refuses deposits that would overflow, and saturating
    /// arithmetic keeps even a hand-made event stream from panicking here.
    pub fn funds_deposited(&mut self, amount: i64) {
        self.balance = self.balance.saturating_add(amount);
    }

    /// Money was paid out.
    pub fn funds_withdrawn(&mut self, amount: i64) {
        self.balance = self.balance.saturating_sub(amount);
    }

    /// The account was closed.
    pub fn account_closed(&mut self) {
        self.status = Status::Closed;
    }

    /// Money left for the transfer `transfer`. (Separate events for the legs of a
    /// transfer: the events stored before transfers existed decode unchanged, and the
    /// transfer process manager finds its transfer in them.)
    pub fn transfer_withdrawn(&mut self, transfer: String, amount: i64) {
        let _ = transfer;
        self.balance = self.balance.saturating_sub(amount);
    }

    /// Money arrived by the transfer `transfer`.
    pub fn transfer_deposited(&mut self, transfer: String, amount: i64) {
        let _ = transfer;
        self.balance = self.balance.saturating_add(amount);
    }

    /// Money of the transfer `transfer` came back.
    pub fn transfer_refunded(&mut self, transfer: String, amount: i64) {
        let _ = transfer;
        self.balance = self.balance.saturating_add(amount);
    }
}

#[cfg(test)]
mod tests {
    use thalo_testing::AggregateTest;

    use super::*;

    fn opened(initial_deposit: i64) -> AccountOpenedEvent {
        AccountOpenedEvent {
            owner: "Ada".into(),
            initial_deposit,
        }
    }

    fn account() -> AggregateTest<BankAccount> {
        AggregateTest::new("ACC-1".to_string())
    }

    #[test]
    fn opens_an_account() {
        account()
            .when(BankAccountCommand::OpenAccount {
                owner: "Ada".into(),
                initial_deposit: 100,
            })
            .then_events([opened(100)])
            .then_state(|a| {
                assert_eq!(a.status(), Status::Open);
                assert_eq!(a.balance(), 100);
                assert_eq!(a.owner(), "Ada");
            });
    }

    #[test]
    fn rejects_bad_owners() {
        for owner in ["", "   ", "Ada\u{0}", "Ada\nLovelace", &"x".repeat(201)] {
            account()
                .when(BankAccountCommand::OpenAccount {
                    owner: owner.to_owned(),
                    initial_deposit: 0,
                })
                .then_error_code("INVALID_OWNER");
        }
    }

    #[test]
    fn account_numbers_are_checked() {
        for good in ["ACC-1", "a_b-9", &"7".repeat(64)] {
            assert!(validate_account_number(good).is_ok(), "{good}");
        }
        for bad in ["", "ACC 1", "ACC/1", "Ä", &"7".repeat(65)] {
            assert_eq!(
                validate_account_number(bad).unwrap_err().code(),
                Some("INVALID_ACCOUNT_NUMBER"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_deposit_that_would_overflow_is_rejected() {
        account()
            .given([opened(i64::MAX)])
            .when(BankAccountCommand::Deposit { amount: 1 })
            .then_error_code("BALANCE_OVERFLOW");
    }

    #[test]
    fn apply_is_total() {
        // Any stored sequence, even one no command would produce, applies without a panic.
        let mut account = BankAccount::default();
        for event in [
            BankAccountEvent::from(opened(i64::MAX)),
            FundsDepositedEvent { amount: i64::MAX }.into(),
            FundsWithdrawnEvent { amount: i64::MAX }.into(),
            FundsWithdrawnEvent { amount: i64::MAX }.into(),
            FundsWithdrawnEvent { amount: i64::MAX }.into(),
            AccountClosedEvent {}.into(),
            FundsDepositedEvent { amount: -1 }.into(),
        ] {
            thalo::Aggregate::apply(&mut account, event);
        }
        assert_eq!(account.status(), Status::Closed);
    }

    #[test]
    fn apply_is_total_for_generated_event_sequences() {
        use proptest::prelude::*;
        let event = prop_oneof![
            (any::<String>(), any::<i64>()).prop_map(|(owner, initial_deposit)| {
                BankAccountEvent::from(AccountOpenedEvent {
                    owner,
                    initial_deposit,
                })
            }),
            any::<i64>().prop_map(|amount| FundsDepositedEvent { amount }.into()),
            any::<i64>().prop_map(|amount| FundsWithdrawnEvent { amount }.into()),
            Just(AccountClosedEvent {}.into()),
            any::<i64>().prop_map(|amount| TransferWithdrawnEvent {
                transfer: "T".into(),
                amount
            }
            .into()),
            any::<i64>().prop_map(|amount| TransferDepositedEvent {
                transfer: "T".into(),
                amount
            }
            .into()),
            any::<i64>().prop_map(|amount| TransferRefundedEvent {
                transfer: "T".into(),
                amount
            }
            .into()),
        ];
        thalo_testing::assert_apply_is_total::<BankAccount>("ACC-1".to_owned(), event, 32);
    }

    #[test]
    fn cannot_open_twice() {
        account()
            .given([opened(0)])
            .when(BankAccountCommand::OpenAccount {
                owner: "Bob".into(),
                initial_deposit: 0,
            })
            .then_error_code("ACCOUNT_ALREADY_OPENED");
    }

    #[test]
    fn cannot_open_with_negative_deposit() {
        account()
            .when(BankAccountCommand::OpenAccount {
                owner: "Ada".into(),
                initial_deposit: -1,
            })
            .then_error_code("NON_POSITIVE_AMOUNT");
    }

    #[test]
    fn deposits() {
        account()
            .given([opened(100)])
            .when(BankAccountCommand::Deposit { amount: 250 })
            .then_events([FundsDepositedEvent { amount: 250 }])
            .then_state(|a| assert_eq!(a.balance(), 350));
    }

    #[test]
    fn rejects_non_positive_amounts() {
        for amount in [0, -5] {
            account()
                .given([opened(100)])
                .when(BankAccountCommand::Deposit { amount })
                .then_error_code("NON_POSITIVE_AMOUNT");
            account()
                .given([opened(100)])
                .when(BankAccountCommand::Withdraw { amount })
                .then_error_code("NON_POSITIVE_AMOUNT");
        }
    }

    #[test]
    fn cannot_use_an_account_that_is_not_open() {
        account()
            .when(BankAccountCommand::Deposit { amount: 1 })
            .then_error_code("ACCOUNT_NOT_OPEN");
        account()
            .when(BankAccountCommand::CloseAccount)
            .then_error_code("ACCOUNT_NOT_OPEN");
    }

    #[test]
    fn withdraws_within_the_balance() {
        account()
            .given([opened(100)])
            .when(BankAccountCommand::Withdraw { amount: 100 })
            .then_events([FundsWithdrawnEvent { amount: 100 }])
            .then_state(|a| assert_eq!(a.balance(), 0));
    }

    #[test]
    fn rejects_overdrafts() {
        account()
            .given([opened(100)])
            .given([FundsWithdrawnEvent { amount: 60 }])
            .when(BankAccountCommand::Withdraw { amount: 41 })
            .then_error(|err| {
                assert_eq!(err.code(), Some("INSUFFICIENT_FUNDS"));
                assert_eq!(
                    err.to_string(),
                    "invariant violated: INSUFFICIENT_FUNDS (balance is 40 cents, withdrawal is 41 cents)"
                );
            });
    }

    #[test]
    fn closing_pays_out_the_balance() {
        account()
            .given([opened(100)])
            .when(BankAccountCommand::CloseAccount)
            .then_events::<[BankAccountEvent; 2]>([
                FundsWithdrawnEvent { amount: 100 }.into(),
                AccountClosedEvent {}.into(),
            ])
            .then_state(|a| {
                assert_eq!(a.status(), Status::Closed);
                assert_eq!(a.balance(), 0);
            });
    }

    #[test]
    fn closing_an_empty_account_only_closes_it() {
        account()
            .given([opened(0)])
            .when(BankAccountCommand::CloseAccount)
            .then_events([AccountClosedEvent {}]);
    }

    #[test]
    fn a_closed_account_rejects_everything() {
        let closed = || account().given([opened(0)]).given([AccountClosedEvent {}]);
        closed()
            .when(BankAccountCommand::Deposit { amount: 1 })
            .then_error_code("ACCOUNT_CLOSED");
        closed()
            .when(BankAccountCommand::Withdraw { amount: 1 })
            .then_error_code("ACCOUNT_CLOSED");
        closed()
            .when(BankAccountCommand::CloseAccount)
            .then_error_code("ACCOUNT_CLOSED");
    }

    #[test]
    fn transfer_legs_move_money_and_name_their_transfer() {
        let t = || "T-1".to_owned();
        account()
            .given([opened(100)])
            .when(BankAccountCommand::WithdrawForTransfer {
                transfer: t(),
                amount: 30,
            })
            .then_events([TransferWithdrawnEvent {
                transfer: t(),
                amount: 30,
            }])
            .then_state(|a| assert_eq!(a.balance(), 70));
        account()
            .given([opened(10)])
            .when(BankAccountCommand::WithdrawForTransfer {
                transfer: t(),
                amount: 30,
            })
            .then_error_code("INSUFFICIENT_FUNDS");
        let closed = || account().given([opened(0)]).given([AccountClosedEvent {}]);
        closed()
            .when(BankAccountCommand::DepositForTransfer {
                transfer: t(),
                amount: 30,
            })
            .then_error_code("ACCOUNT_CLOSED");
        // A refund is never refused: the money was the account's.
        closed()
            .when(BankAccountCommand::RefundTransfer {
                transfer: t(),
                amount: 30,
            })
            .then_events([TransferRefundedEvent {
                transfer: t(),
                amount: 30,
            }])
            .then_state(|a| assert_eq!(a.balance(), 30));
    }

    #[test]
    fn event_type_names_are_stable() {
        use thalo::Event;
        let event: BankAccountEvent = opened(1).into();
        assert_eq!(event.event_type(), "AccountOpened");
        assert_eq!(
            BankAccountEvent::event_types(),
            [
                "AccountOpened",
                "FundsDeposited",
                "FundsWithdrawn",
                "AccountClosed",
                "TransferWithdrawn",
                "TransferDeposited",
                "TransferRefunded"
            ]
        );
        assert_eq!(
            event.encode().expect("encode"),
            r#"{"owner":"Ada","initial_deposit":1}"#
        );
    }
}
