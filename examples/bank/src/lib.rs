//! The bank example: a `BankAccount` aggregate, a balances projection, and transfers
//! between accounts (a `Transfer` aggregate and a process manager).
//!
//! Money is kept in integer minor units (cents), never floating point.

// Amounts in cents are written as `dollars_cents` (`100_00` is $100.00).
#![allow(clippy::inconsistent_digit_grouping)]

pub mod account;
pub mod balances;
pub mod http;
pub mod money;
pub mod owners;
pub mod pg;
pub mod prometheus;
pub mod readiness;
pub mod service;
pub mod transfer;

pub use account::{BankAccount, BankAccountCommand, BankAccountEvent};
pub use balances::Balances;
pub use transfer::{MoneyEvent, Transfer, TransferCommand, TransferEvent, Transfers};
