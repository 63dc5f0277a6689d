//! Transfers between accounts: the `Transfer` aggregate records what happened to one
//! transfer, and the [`Transfers`] process manager moves the money.
//!
//! A transfer is requested (`POST /transfers`), then the process manager withdraws the
//! amount from `from` and deposits it to `to`. A withdrawal the account rejects
//! (insufficient funds, closed) fails the transfer with nothing moved; a deposit the
//! account rejects (closed) is compensated by refunding `from`, and so is a deposit that
//! has not started when the `timeout` timer fires. Every command goes through the
//! repository exactly once, under a key derived from the event (or timer) that caused
//! it, so a process manager that crashes and handles an event again moves no money
//! twice.
//!
//! # Deposit or refund: the transfer decides
//!
//! The deposit and the timeout's refund exclude each other. The process manager's state
//! alone would keep them apart: it is saved only after the commands ran, but the runner
//! records an input with commands as pending (`process_states.pending`) before running
//! them, and after a crash it replays the interrupted input first, from the saved state
//! and under the same keys: an interrupted timer before any other input of the
//! instance, interrupted events before any of its timers. So a restarted runner never
//! sees the instance's next event before the timer it had fired, and the state that
//! chose the refund is not lost. Which way a transfer went is part of the domain,
//! though, and readers of the transfer must see it, so the `Transfer` aggregate, whose
//! stream both paths meet in, records the choice: the account's withdrawal is recorded
//! with `RecordWithdrawal` and the timer asks for `TimeOut`; whichever comes first is
//! stored (`TransferMoneyWithdrawn` or `TransferTimedOut`), the other decides nothing.
//! The deposit reacts to `TransferMoneyWithdrawn`, the timeout's refund to
//! `TransferTimedOut`: one event each, so one command each, under that event's key.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thalo::{
    commands, events, Action, Aggregate, Error, EventEnvelope, EventStore, ProcessManager,
};

use crate::account::validate_account_number;
use crate::{BankAccount, BankAccountCommand, BankAccountEvent};

/// Where a transfer is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    /// No `TransferRequested` yet.
    #[default]
    New,
    /// Requested; the withdrawal is on its way.
    Requested,
    /// The money has left `from`.
    Withdrawn,
    /// The money has arrived at `to`.
    Completed,
    /// The deposit was rejected or timed out, and `from` got its money back.
    Compensated,
    /// The withdrawal was rejected; nothing moved.
    Failed,
}

impl TransferStatus {
    /// Whether the transfer is over.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TransferStatus::Completed | TransferStatus::Compensated | TransferStatus::Failed
        )
    }
}

/// One transfer of money between two accounts. Amounts are in cents.
#[derive(Aggregate, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    #[identity]
    id: String,
    from: String,
    to: String,
    amount: i64,
    status: TransferStatus,
    reason: Option<String>,
}

impl Transfer {
    /// The transfer's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The account the money comes from.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The account the money goes to.
    pub fn to(&self) -> &str {
        &self.to
    }

    /// Cents.
    pub fn amount(&self) -> i64 {
        self.amount
    }

    /// Where the transfer is.
    pub fn status(&self) -> TransferStatus {
        self.status
    }

    /// Why it was compensated or failed (the rejection's code, or `TIMED_OUT`).
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    fn ensure_running(&self) -> Result<(), Error> {
        match self.status {
            TransferStatus::Requested | TransferStatus::Withdrawn => Ok(()),
            TransferStatus::New => Err(Error::invariant_code("TRANSFER_NOT_REQUESTED")),
            _ => Err(Error::invariant_code("TRANSFER_FINISHED")),
        }
    }
}

/// The reason of a transfer compensated by its timer.
pub const TIMED_OUT: &str = "TIMED_OUT";

#[commands]
impl Transfer {
    /// Requests a transfer of `amount` cents from `from` to `to`.
    pub fn request(
        &self,
        from: String,
        to: String,
        amount: i64,
    ) -> Result<TransferRequestedEvent, Error> {
        if self.status != TransferStatus::New {
            return Err(Error::invariant_code("TRANSFER_ALREADY_REQUESTED"));
        }
        validate_account_number(&from)?;
        validate_account_number(&to)?;
        if from == to {
            return Err(Error::invariant(
                "SAME_ACCOUNT",
                "a transfer needs two different accounts",
            ));
        }
        if amount <= 0 {
            return Err(Error::invariant(
                "NON_POSITIVE_AMOUNT",
                format!("amounts must be positive, got {amount} cents"),
            ));
        }
        Ok(TransferRequestedEvent { from, to, amount })
    }

    /// Records that the money has left `from`, so it may be deposited; nothing when the
    /// transfer timed out first.
    pub fn record_withdrawal(&self) -> Result<Option<TransferMoneyWithdrawnEvent>, Error> {
        self.ensure_running()?;
        Ok((self.status == TransferStatus::Requested).then_some(TransferMoneyWithdrawnEvent {}))
    }

    /// Times the transfer out, so `from` is refunded; nothing when the withdrawal was
    /// recorded first (the deposit is under way). Its timer fires only after a
    /// withdrawal that succeeded: a rejected one cancels it.
    pub fn time_out(&self) -> Result<Option<TransferTimedOutEvent>, Error> {
        self.ensure_running()?;
        Ok((self.status == TransferStatus::Requested).then_some(TransferTimedOutEvent {}))
    }

    /// Completes the transfer: the money has arrived.
    pub fn complete(&self) -> Result<TransferCompletedEvent, Error> {
        self.ensure_running()?;
        Ok(TransferCompletedEvent {})
    }

    /// Records that `from` got its money back, because of `reason`.
    pub fn compensate(&self, reason: String) -> Result<TransferCompensatedEvent, Error> {
        self.ensure_running()?;
        Ok(TransferCompensatedEvent { reason })
    }

    /// Fails the transfer: the withdrawal was rejected for `reason`.
    pub fn fail(&self, reason: String) -> Result<TransferFailedEvent, Error> {
        self.ensure_running()?;
        Ok(TransferFailedEvent { reason })
    }
}

#[events]
impl Transfer {
    /// A transfer was requested.
    pub fn transfer_requested(&mut self, from: String, to: String, amount: i64) {
        self.from = from;
        self.to = to;
        self.amount = amount;
        self.status = TransferStatus::Requested;
    }

    /// The money has left `from`.
    pub fn transfer_money_withdrawn(&mut self) {
        self.status = TransferStatus::Withdrawn;
    }

    /// The deposit did not start in time: `from` is refunded.
    pub fn transfer_timed_out(&mut self) {
        self.status = TransferStatus::Withdrawn;
    }

    /// The money has arrived at `to`.
    pub fn transfer_completed(&mut self) {
        self.status = TransferStatus::Completed;
    }

    /// `from` got its money back.
    pub fn transfer_compensated(&mut self, reason: String) {
        self.status = TransferStatus::Compensated;
        self.reason = Some(reason);
    }

    /// The withdrawal was rejected.
    pub fn transfer_failed(&mut self, reason: String) {
        self.status = TransferStatus::Failed;
        self.reason = Some(reason);
    }
}

thalo::event_set! {
    /// What the transfer process manager and the owners view read: transfers and
    /// accounts.
    #[derive(PartialEq)]
    pub enum MoneyEvent {
        Transfer(Transfer),
        BankAccount(BankAccount),
    }
}

/// The transfer process manager. `timeout` is how long a withdrawn transfer may wait
/// for its deposit before `from` is refunded.
#[derive(Clone, Debug)]
pub struct Transfers {
    /// The deposit's deadline, from the request.
    pub timeout: Duration,
}

/// The name of the deposit's timer.
pub const TIMEOUT: &str = "timeout";

/// What the process manager knows of one transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferState {
    /// The transfer's id.
    pub id: String,
    /// From this account.
    pub from: String,
    /// To this account.
    pub to: String,
    /// Cents.
    pub amount: i64,
    /// Why `from` is being refunded, once it is.
    pub refund: Option<String>,
}

impl TransferState {
    fn refund<S: EventStore>(&mut self, reason: &str) -> Vec<Action<S>> {
        self.refund = Some(reason.to_owned());
        vec![
            Action::cancel_timer(TIMEOUT),
            Action::command::<BankAccount>(
                "refund",
                self.from.clone(),
                BankAccountCommand::RefundTransfer {
                    transfer: self.id.clone(),
                    amount: self.amount,
                },
            ),
        ]
    }

    fn transfer<S: EventStore>(&self, step: &str, command: TransferCommand) -> Action<S> {
        Action::command::<Transfer>(step, self.id.clone(), command)
    }
}

impl ProcessManager for Transfers {
    type Event = MoneyEvent;
    type State = TransferState;

    fn name(&self) -> &str {
        "transfers"
    }

    fn correlate(&self, envelope: &EventEnvelope<MoneyEvent>) -> Option<String> {
        match &envelope.event {
            MoneyEvent::Transfer(_) => Some(envelope.aggregate_id.clone()),
            MoneyEvent::BankAccount(BankAccountEvent::TransferWithdrawn(e)) => {
                Some(e.transfer.clone())
            }
            MoneyEvent::BankAccount(BankAccountEvent::TransferDeposited(e)) => {
                Some(e.transfer.clone())
            }
            MoneyEvent::BankAccount(BankAccountEvent::TransferRefunded(e)) => {
                Some(e.transfer.clone())
            }
            MoneyEvent::BankAccount(_) => None,
        }
    }

    fn react<S: EventStore>(
        &self,
        state: &mut TransferState,
        envelope: &EventEnvelope<MoneyEvent>,
    ) -> Result<Vec<Action<S>>, Error> {
        Ok(match &envelope.event {
            MoneyEvent::Transfer(TransferEvent::TransferRequested(e)) => {
                *state = TransferState {
                    id: envelope.aggregate_id.clone(),
                    from: e.from.clone(),
                    to: e.to.clone(),
                    amount: e.amount,
                    refund: None,
                };
                // The timer first: a rejected withdrawal's `fail` cancels it, so the
                // timer fires only after a withdrawal that succeeded.
                vec![
                    Action::set_timer(TIMEOUT, self.timeout),
                    Action::command::<BankAccount>(
                        "withdraw",
                        state.from.clone(),
                        BankAccountCommand::WithdrawForTransfer {
                            transfer: state.id.clone(),
                            amount: state.amount,
                        },
                    ),
                ]
            }
            // Deposit or time out: the transfer decides (see the module docs).
            MoneyEvent::BankAccount(BankAccountEvent::TransferWithdrawn(_)) => {
                vec![state.transfer("record-withdrawal", TransferCommand::RecordWithdrawal {})]
            }
            MoneyEvent::Transfer(TransferEvent::TransferMoneyWithdrawn(_)) => {
                vec![Action::command::<BankAccount>(
                    "deposit",
                    state.to.clone(),
                    BankAccountCommand::DepositForTransfer {
                        transfer: state.id.clone(),
                        amount: state.amount,
                    },
                )]
            }
            MoneyEvent::Transfer(TransferEvent::TransferTimedOut(_)) => state.refund(TIMED_OUT),
            MoneyEvent::BankAccount(BankAccountEvent::TransferDeposited(_)) => vec![
                Action::cancel_timer(TIMEOUT),
                state.transfer("complete", TransferCommand::Complete {}),
            ],
            MoneyEvent::BankAccount(BankAccountEvent::TransferRefunded(_)) => {
                let reason = state.refund.clone().unwrap_or_default();
                vec![state.transfer("compensate", TransferCommand::Compensate { reason })]
            }
            MoneyEvent::Transfer(
                TransferEvent::TransferCompleted(_)
                | TransferEvent::TransferCompensated(_)
                | TransferEvent::TransferFailed(_),
            ) => vec![Action::Complete],
            MoneyEvent::BankAccount(_) => Vec::new(),
        })
    }

    fn on_timer<S: EventStore>(
        &self,
        state: &mut TransferState,
        timer: &str,
    ) -> Result<Vec<Action<S>>, Error> {
        // Only a command, no decision on the state: the transfer times out unless the
        // withdrawal was recorded first (see the module docs).
        if timer != TIMEOUT {
            return Ok(Vec::new());
        }
        Ok(vec![state.transfer("time-out", TransferCommand::TimeOut {})])
    }

    fn on_rejected<S: EventStore>(
        &self,
        state: &mut TransferState,
        step: &str,
        error: &Error,
    ) -> Result<Vec<Action<S>>, Error> {
        let reason = error.code().unwrap_or("REJECTED").to_owned();
        Ok(match step {
            "withdraw" => vec![
                Action::cancel_timer(TIMEOUT),
                state.transfer("fail", TransferCommand::Fail { reason }),
            ],
            "deposit" => state.refund(&reason),
            // A transfer already finished: nothing left to do.
            _ => Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use thalo_testing::ProcessManagerTest;

    use super::*;
    use crate::account::{TransferDepositedEvent, TransferRefundedEvent, TransferWithdrawnEvent};

    fn transfers() -> Transfers {
        Transfers {
            timeout: Duration::from_secs(30),
        }
    }

    fn requested() -> TransferRequestedEvent {
        TransferRequestedEvent {
            from: "ACC-1".into(),
            to: "ACC-2".into(),
            amount: 30_00,
        }
    }

    fn withdrawn() -> TransferWithdrawnEvent {
        TransferWithdrawnEvent {
            transfer: "T-1".into(),
            amount: 30_00,
        }
    }

    fn refunded() -> TransferRefundedEvent {
        TransferRefundedEvent {
            transfer: "T-1".into(),
            amount: 30_00,
        }
    }

    const WITHDRAW: &str =
        r#"withdraw: bank_account/ACC-1 WithdrawForTransfer { transfer: "T-1", amount: 3000 }"#;
    const RECORD: &str = "record-withdrawal: transfer/T-1 RecordWithdrawal";
    const DEPOSIT: &str =
        r#"deposit: bank_account/ACC-2 DepositForTransfer { transfer: "T-1", amount: 3000 }"#;
    const REFUND: &str =
        r#"refund: bank_account/ACC-1 RefundTransfer { transfer: "T-1", amount: 3000 }"#;

    /// A transfer past its request and the account's withdrawal.
    fn withdrawing() -> ProcessManagerTest<Transfers> {
        ProcessManagerTest::new(transfers())
            .given::<Transfer>("T-1".into(), requested())
            .given::<BankAccount>("ACC-1".into(), withdrawn())
    }

    #[test]
    fn a_transfer_withdraws_deposits_and_completes() {
        ProcessManagerTest::new(transfers())
            .when::<Transfer>("T-1".into(), requested())
            .then_commands(&[WITHDRAW])
            .then_timer_set(TIMEOUT)
            .then_running();
        ProcessManagerTest::new(transfers())
            .given::<Transfer>("T-1".into(), requested())
            .when::<BankAccount>("ACC-1".into(), withdrawn())
            .then_commands(&[RECORD])
            .then_timer_set(TIMEOUT);
        withdrawing()
            .when::<Transfer>("T-1".into(), TransferMoneyWithdrawnEvent {})
            .then_commands(&[DEPOSIT])
            .then_timer_set(TIMEOUT);
        withdrawing()
            .given::<Transfer>("T-1".into(), TransferMoneyWithdrawnEvent {})
            .when::<BankAccount>(
                "ACC-2".into(),
                TransferDepositedEvent {
                    transfer: "T-1".into(),
                    amount: 30_00,
                },
            )
            .then_commands(&["complete: transfer/T-1 Complete"])
            .then_timer_not_set(TIMEOUT);
        ProcessManagerTest::new(transfers())
            .given::<Transfer>("T-1".into(), requested())
            .when::<Transfer>("T-1".into(), TransferCompletedEvent {})
            .then_commands(&[])
            .then_completed();
    }

    #[test]
    fn a_rejected_deposit_is_compensated() {
        withdrawing()
            .rejecting("deposit", Error::invariant_code("ACCOUNT_CLOSED"))
            .when::<Transfer>("T-1".into(), TransferMoneyWithdrawnEvent {})
            .then_commands(&[DEPOSIT, REFUND])
            .then_timer_not_set(TIMEOUT)
            .then_state(|s| assert_eq!(s.refund.as_deref(), Some("ACCOUNT_CLOSED")));
        withdrawing()
            .rejecting("deposit", Error::invariant_code("ACCOUNT_CLOSED"))
            .given::<Transfer>("T-1".into(), TransferMoneyWithdrawnEvent {})
            .when::<BankAccount>("ACC-1".into(), refunded())
            .then_commands(&[
                r#"compensate: transfer/T-1 Compensate { reason: "ACCOUNT_CLOSED" }"#,
            ]);
    }

    #[test]
    fn a_deposit_that_times_out_is_compensated() {
        // The timer asks the transfer to time out ...
        ProcessManagerTest::new(transfers())
            .given::<Transfer>("T-1".into(), requested())
            .when_timer(TIMEOUT)
            .then_commands(&["time-out: transfer/T-1 TimeOut"]);
        // ... and its timing out refunds `from`, then compensates.
        ProcessManagerTest::new(transfers())
            .given::<Transfer>("T-1".into(), requested())
            .when::<Transfer>("T-1".into(), TransferTimedOutEvent {})
            .then_commands(&[REFUND])
            .then_timer_not_set(TIMEOUT)
            .then_state(|s| assert_eq!(s.refund.as_deref(), Some(TIMED_OUT)));
        ProcessManagerTest::new(transfers())
            .given::<Transfer>("T-1".into(), requested())
            .given::<Transfer>("T-1".into(), TransferTimedOutEvent {})
            .given::<BankAccount>("ACC-1".into(), withdrawn())
            .when::<BankAccount>("ACC-1".into(), refunded())
            .then_commands(&[r#"compensate: transfer/T-1 Compensate { reason: "TIMED_OUT" }"#]);
    }

    #[test]
    fn the_transfer_lets_either_the_deposit_or_the_timeout_through() {
        let transfer = |events: Vec<TransferEvent>| {
            let mut t = <Transfer as Aggregate>::new("T-1".to_owned());
            t.apply(requested().into());
            for event in events {
                t.apply(event);
            }
            t
        };
        let decide = |t: &Transfer, command| Aggregate::handle(t, command).expect("decides");
        let fresh = transfer(vec![]);
        assert_eq!(
            decide(&fresh, TransferCommand::RecordWithdrawal {}).len(),
            1
        );
        assert_eq!(decide(&fresh, TransferCommand::TimeOut {}).len(), 1);
        let withdrawn = transfer(vec![TransferMoneyWithdrawnEvent {}.into()]);
        assert!(decide(&withdrawn, TransferCommand::TimeOut {}).is_empty());
        let timed_out = transfer(vec![TransferTimedOutEvent {}.into()]);
        assert!(decide(&timed_out, TransferCommand::RecordWithdrawal {}).is_empty());
    }

    #[test]
    fn a_rejected_withdrawal_fails_the_transfer() {
        ProcessManagerTest::new(transfers())
            .rejecting("withdraw", Error::invariant_code("INSUFFICIENT_FUNDS"))
            .when::<Transfer>("T-1".into(), requested())
            .then_commands(&[
                WITHDRAW,
                r#"fail: transfer/T-1 Fail { reason: "INSUFFICIENT_FUNDS" }"#,
            ])
            .then_timer_not_set(TIMEOUT);
    }

    #[test]
    fn other_account_events_are_ignored() {
        ProcessManagerTest::new(transfers())
            .when::<BankAccount>(
                "ACC-1".into(),
                crate::account::FundsDepositedEvent { amount: 5 },
            )
            .then_commands(&[])
            .then_state(|s| assert_eq!(*s, TransferState::default()));
    }
}
