//! A small transfer process manager over two aggregate types, `Wallet` and `Transfer`,
//! for the process-manager tests. (`thalo-postgres/tests/process.rs` includes this file too.)
//!
//! A transfer withdraws from `from`, then deposits to `to` (after an approval, for a
//! transfer that needs one), then completes. A rejected withdrawal fails it; a rejected
//! deposit refunds `from`, then fails it; the `timeout` timer refunds a withdrawal that
//! was not deposited in time, or fails a transfer that never withdrew.

#![allow(dead_code, missing_docs, unreachable_pub)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thalo::{
    commands, events, Action, Aggregate, Error, EventEnvelope, EventStore, ProcessManager,
};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Wallet {
    #[identity]
    id: String,
    cents: i64,
    opened: bool,
    closed: bool,
}

#[commands]
impl Wallet {
    pub fn open(&self, cents: i64) -> Result<OpenedEvent, Error> {
        Ok(OpenedEvent { cents })
    }

    pub fn withdraw(&self, transfer: String, cents: i64) -> Result<WithdrawnEvent, Error> {
        if !self.opened || self.closed {
            return Err(Error::invariant_code("WALLET_NOT_OPEN"));
        }
        if self.cents < cents {
            return Err(Error::invariant_code("INSUFFICIENT_FUNDS"));
        }
        Ok(WithdrawnEvent { transfer, cents })
    }

    pub fn deposit(&self, transfer: String, cents: i64) -> Result<DepositedEvent, Error> {
        if !self.opened || self.closed {
            return Err(Error::invariant_code("WALLET_NOT_OPEN"));
        }
        Ok(DepositedEvent { transfer, cents })
    }

    pub fn refund(&self, transfer: String, cents: i64) -> Result<RefundedEvent, Error> {
        Ok(RefundedEvent { transfer, cents })
    }

    pub fn close(&self) -> Result<ClosedEvent, Error> {
        Ok(ClosedEvent {})
    }
}

#[events]
impl Wallet {
    pub fn opened(&mut self, cents: i64) {
        self.cents = cents;
        self.opened = true;
    }

    pub fn withdrawn(&mut self, transfer: String, cents: i64) {
        let _ = transfer;
        self.cents -= cents;
    }

    pub fn deposited(&mut self, transfer: String, cents: i64) {
        let _ = transfer;
        self.cents += cents;
    }

    pub fn refunded(&mut self, transfer: String, cents: i64) {
        let _ = transfer;
        self.cents += cents;
    }

    pub fn closed(&mut self) {
        self.closed = true;
    }
}

impl Wallet {
    pub fn cents(&self) -> i64 {
        self.cents
    }
}

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Transfer {
    #[identity]
    id: String,
}

#[commands]
impl Transfer {
    pub fn start(
        &self,
        from: String,
        to: String,
        cents: i64,
        approval: bool,
    ) -> Result<StartedEvent, Error> {
        Ok(StartedEvent {
            from,
            to,
            cents,
            approval,
        })
    }

    pub fn approve(&self) -> Result<ApprovedEvent, Error> {
        Ok(ApprovedEvent {})
    }

    pub fn complete(&self) -> Result<CompletedEvent, Error> {
        Ok(CompletedEvent {})
    }

    pub fn fail(&self, reason: String) -> Result<FailedEvent, Error> {
        Ok(FailedEvent { reason })
    }
}

#[events]
impl Transfer {
    pub fn started(&mut self, from: String, to: String, cents: i64, approval: bool) {
        let _ = (from, to, cents, approval);
    }

    pub fn approved(&mut self) {}

    pub fn completed(&mut self) {}

    pub fn failed(&mut self, reason: String) {
        let _ = reason;
    }
}

thalo::event_set! {
    /// What the transfer process manager reads.
    #[derive(PartialEq)]
    pub enum Money {
        Transfer(Transfer),
        Wallet(Wallet),
    }
}

/// The process manager; `timeout` is how long a withdrawal may wait for its deposit.
#[derive(Clone, Debug)]
pub struct Transfers {
    pub timeout: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferState {
    pub id: String,
    pub from: String,
    pub to: String,
    pub cents: i64,
    pub approval: bool,
    pub approved: bool,
    pub withdrawn: bool,
    pub depositing: bool,
    pub refunding: bool,
    pub failure: Option<String>,
    /// The timeout fired before the withdrawal was seen: refund it when it is.
    #[serde(default)]
    pub timed_out: bool,
}

impl TransferState {
    fn deposit<S: EventStore>(&mut self) -> Vec<Action<S>> {
        self.depositing = true;
        vec![Action::command::<Wallet>(
            "deposit",
            self.to.clone(),
            WalletCommand::Deposit {
                transfer: self.id.clone(),
                cents: self.cents,
            },
        )]
    }

    fn refund<S: EventStore>(&mut self, reason: &str) -> Vec<Action<S>> {
        self.refunding = true;
        self.failure = Some(reason.to_owned());
        vec![Action::command::<Wallet>(
            "refund",
            self.from.clone(),
            WalletCommand::Refund {
                transfer: self.id.clone(),
                cents: self.cents,
            },
        )]
    }

    fn fail<S: EventStore>(&mut self, reason: &str) -> Vec<Action<S>> {
        self.failure = Some(reason.to_owned());
        vec![
            Action::cancel_timer("timeout"),
            Action::command::<Transfer>(
                "fail",
                self.id.clone(),
                TransferCommand::Fail {
                    reason: reason.to_owned(),
                },
            ),
        ]
    }
}

impl ProcessManager for Transfers {
    type Event = Money;
    type State = TransferState;

    fn name(&self) -> &str {
        "transfers"
    }

    fn correlate(&self, envelope: &EventEnvelope<Money>) -> Option<String> {
        match &envelope.event {
            Money::Transfer(_) => Some(envelope.aggregate_id.clone()),
            Money::Wallet(WalletEvent::Withdrawn(e)) => Some(e.transfer.clone()),
            Money::Wallet(WalletEvent::Deposited(e)) => Some(e.transfer.clone()),
            Money::Wallet(WalletEvent::Refunded(e)) => Some(e.transfer.clone()),
            Money::Wallet(_) => None,
        }
    }

    fn react<S: EventStore>(
        &self,
        state: &mut TransferState,
        envelope: &EventEnvelope<Money>,
    ) -> Result<Vec<Action<S>>, Error> {
        Ok(match &envelope.event {
            Money::Transfer(TransferEvent::Started(e)) => {
                *state = TransferState {
                    id: envelope.aggregate_id.clone(),
                    from: e.from.clone(),
                    to: e.to.clone(),
                    cents: e.cents,
                    approval: e.approval,
                    ..TransferState::default()
                };
                // The timer first: a rejected withdrawal's compensation cancels it.
                vec![
                    Action::set_timer("timeout", self.timeout),
                    Action::command::<Wallet>(
                        "withdraw",
                        e.from.clone(),
                        WalletCommand::Withdraw {
                            transfer: state.id.clone(),
                            cents: e.cents,
                        },
                    ),
                ]
            }
            Money::Wallet(WalletEvent::Withdrawn(_)) => {
                state.withdrawn = true;
                if state.timed_out {
                    state.refund("timed out")
                } else if state.approval && !state.approved {
                    Vec::new()
                } else {
                    state.deposit()
                }
            }
            Money::Transfer(TransferEvent::Approved(_)) => {
                state.approved = true;
                if state.withdrawn && !state.depositing && !state.refunding {
                    state.deposit()
                } else {
                    Vec::new()
                }
            }
            Money::Wallet(WalletEvent::Deposited(_)) => vec![
                Action::cancel_timer("timeout"),
                Action::command::<Transfer>(
                    "complete",
                    state.id.clone(),
                    TransferCommand::Complete {},
                ),
            ],
            Money::Wallet(WalletEvent::Refunded(_)) => {
                let reason = state.failure.clone().unwrap_or_default();
                state.fail(&reason)
            }
            Money::Transfer(TransferEvent::Completed(_) | TransferEvent::Failed(_)) => {
                vec![Action::Complete]
            }
            Money::Wallet(_) => Vec::new(),
        })
    }

    fn on_timer<S: EventStore>(
        &self,
        state: &mut TransferState,
        timer: &str,
    ) -> Result<Vec<Action<S>>, Error> {
        if timer != "timeout" || state.depositing || state.refunding {
            return Ok(Vec::new());
        }
        Ok(if state.withdrawn {
            state.refund("timed out")
        } else {
            // The withdrawal succeeded (a rejected one cancels the timer in the same
            // step) but its event is not handled yet: refund it when it is, rather than
            // fail now and lose the money withdrawn.
            state.timed_out = true;
            Vec::new()
        })
    }

    fn on_rejected<S: EventStore>(
        &self,
        state: &mut TransferState,
        step: &str,
        error: &Error,
    ) -> Result<Vec<Action<S>>, Error> {
        let reason = error.code().unwrap_or("rejected").to_owned();
        Ok(match step {
            "withdraw" => state.fail(&reason),
            "deposit" => {
                state.depositing = false;
                state.refund(&reason)
            }
            _ => Vec::new(),
        })
    }
}
