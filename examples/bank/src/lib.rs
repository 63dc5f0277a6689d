//! The bank example: a `BankAccount` aggregate and a balances projection.
//!
//! Money is kept in integer minor units (cents), never floating point.

// Amounts in cents are written as `dollars_cents` (`100_00` is $100.00).
#![allow(clippy::inconsistent_digit_grouping)]

pub mod account;
pub mod balances;
pub mod http;
pub mod money;
pub mod pg;
pub mod prometheus;
pub mod readiness;
pub mod service;

pub use account::{BankAccount, BankAccountCommand, BankAccountEvent};
pub use balances::Balances;
