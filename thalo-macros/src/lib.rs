//! Procedural macros for [Thalo](https://docs.rs/thalo): `#[derive(Aggregate)]`,
//! `#[commands]`, `#[events]` and `#[derive(ErrorCode)]`.
//!
//! Use them through `thalo`, which re-exports them (feature `macros`, on by default) and
//! provides the traits and the `thalo::__private` support code that the generated code
//! names. Depending on this crate alone is not useful.
//!
//! The three macros work together on one aggregate:
//!
//! ```
//! use thalo::{commands, events, Aggregate, AggregateType, Error};
//!
//! #[derive(Aggregate, Clone, Debug, Default)]
//! pub struct BankAccount {
//!     #[identity]
//!     account_number: String,
//!     balance_cents: i64,
//!     opened: bool,
//! }
//!
//! #[commands]
//! impl BankAccount {
//!     /// Opens the account with an initial deposit.
//!     pub fn open_account(&self, initial_cents: i64) -> Result<AccountOpenedEvent, Error> {
//!         if self.opened {
//!             return Err(Error::invariant_code("ACCOUNT_ALREADY_OPENED"));
//!         }
//!         Ok(AccountOpenedEvent { initial_cents })
//!     }
//! }
//!
//! #[events]
//! impl BankAccount {
//!     /// The account was opened.
//!     pub fn account_opened(&mut self, initial_cents: i64) {
//!         self.balance_cents = initial_cents;
//!         self.opened = true;
//!     }
//! }
//!
//! use thalo::Aggregate as _;
//!
//! let mut account = BankAccount::new("acc-1".to_owned());
//! let events = account
//!     .handle(BankAccountCommand::OpenAccount { initial_cents: 10_00 })
//!     .unwrap();
//! assert_eq!(
//!     events,
//!     [BankAccountEvent::AccountOpened(AccountOpenedEvent { initial_cents: 10_00 })]
//! );
//! for event in events {
//!     account.apply(event);
//! }
//! assert_eq!(account.balance_cents, 10_00);
//! assert_eq!(BankAccount::TYPE, "bank_account");
//! ```
//!
//! # Errors
//!
//! Every mistake is reported on the token that causes it, all at once, and the generated
//! types are still defined (with what could be read), so uses of `BankAccountCommand`
//! elsewhere do not add a cascade of "cannot find type" errors. The compile-fail cases
//! in `tests/ui/fail` show each message.

#![warn(missing_docs)]
mod aggregate;
mod ast;
mod attr;
mod commands;
mod ctxt;
mod error_code;
mod events;
mod fallback;
mod span;
mod valid;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput, ItemImpl};

use crate::ast::Kind;

/// Implements `thalo::AggregateType` and `thalo::Aggregate` for a struct.
///
/// The struct needs named fields, exactly one of which is marked `#[identity]`: its type
/// (`String`, `Uuid`, an integer, a newtype; anything `Clone + Debug + Display`) becomes
/// `Aggregate::Id`. `Aggregate::new` sets that field and every other field to its
/// `Default`, so each field type needs `Default` but the struct does not.
///
/// `handle` and `apply` are delegated to `<Name>Command` and `<Name>Event`, which
/// [`macro@commands`] and [`macro@events`] generate from the aggregate's impl blocks; the
/// aggregate's error type is the error type of its command methods, and
/// `Aggregate::reject` keeps that type's `thalo::ErrorCode` when it has one (see
/// [`macro@ErrorCode`]).
///
/// # Attributes
///
/// - `#[aggregate(name = "account")]`: the stable type name stored with every event.
///   Defaults to the struct's name in snake case (`BankAccount` is `bank_account`).
///   Lowercase ASCII letters, digits, `_`, `.` and `-`.
/// - `#[aggregate(snapshot)]`: implement `Aggregate::to_snapshot` and
///   `Aggregate::from_snapshot` with serde's JSON. The struct must then derive
///   `serde::Serialize` and `serde::Deserialize` (through `thalo::__private::serde` if
///   the crate does not depend on serde).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use thalo::{commands, events, Aggregate, AggregateType, Error};
///
/// #[derive(Aggregate, Clone, Debug, Default, Serialize, Deserialize)]
/// #[aggregate(name = "counter.v1", snapshot)]
/// pub struct Counter {
///     #[identity]
///     id: u64,
///     value: u64,
/// }
///
/// #[commands]
/// impl Counter {
///     /// Adds `by` to the counter.
///     pub fn increment(&self, by: u64) -> Result<IncrementedEvent, Error> {
///         Ok(IncrementedEvent { by })
///     }
/// }
///
/// #[events]
/// impl Counter {
///     /// The counter went up.
///     pub fn incremented(&mut self, by: u64) {
///         self.value += by;
///     }
/// }
///
/// use thalo::Aggregate as _;
///
/// let mut counter = Counter::new(7);
/// counter.apply(IncrementedEvent { by: 2 }.into());
/// let snapshot = counter.to_snapshot().unwrap().unwrap();
/// let restored = Counter::from_snapshot(&snapshot).unwrap();
/// assert_eq!((*restored.id(), restored.value), (7, 2));
/// assert_eq!(Counter::TYPE, "counter.v1");
/// ```
#[proc_macro_derive(Aggregate, attributes(aggregate, identity))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    aggregate::expand(&input).into()
}

/// Implements `thalo::ErrorCode` for a domain error type: a stable, machine-readable
/// code per value, which a command rejected with the error carries in
/// `thalo::Error::Domain` (aggregates made with `#[derive(Aggregate)]` pick it up by
/// themselves).
///
/// - An enum: each variant's code is its name in `SCREAMING_SNAKE_CASE`
///   (`TooManyBooks` is `TOO_MANY_BOOKS`), or the string of `#[code("...")]` on the
///   variant.
/// - A struct: the struct's name in `SCREAMING_SNAKE_CASE`, or `#[code("...")]` on the
///   struct.
///
/// Codes are read by programs (API clients, tests, stored rejections), so a code must
/// not change when a variant is renamed: pin the old one with `#[code("...")]`.
///
/// ```
/// use thalo::{Error, ErrorCode};
///
/// #[derive(Debug, thiserror::Error, ErrorCode)]
/// pub enum LoanError {
///     #[error("the member is suspended")]
///     #[code("MEMBER_SUSPENDED")]
///     Suspended,
///     #[error("{0} books are too many")]
///     TooManyBooks(u32),
/// }
///
/// #[derive(Debug, thiserror::Error, ErrorCode)]
/// #[error("the library is closed")]
/// pub struct LibraryClosed;
///
/// assert_eq!(LoanError::Suspended.code(), "MEMBER_SUSPENDED");
/// assert_eq!(LoanError::TooManyBooks(9).code(), "TOO_MANY_BOOKS");
/// assert_eq!(LibraryClosed.code(), "LIBRARY_CLOSED");
/// assert_eq!(Error::coded(LoanError::Suspended).code(), Some("MEMBER_SUSPENDED"));
/// ```
#[proc_macro_derive(ErrorCode, attributes(code))]
pub fn derive_error_code(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    error_code::expand(&input).into()
}

/// Generates the command enum of an aggregate from its command methods.
///
/// Goes on an inherent impl block of the aggregate. Every `pub` method (including
/// `pub(crate)` and the like) is a command: it
/// takes `&self` and owned arguments, and returns `Result<E, Error>`,
/// `Result<Vec<E>, Error>` or `Result<Option<E>, Error>`, where `E` is an event struct
/// generated by [`macro@events`] or the event enum. Methods that are not `pub` are
/// helpers and are left alone.
///
/// For `impl BankAccount`, it generates `pub enum BankAccountCommand` with one variant
/// per command, named in PascalCase (`open_account` is `OpenAccount { initial_balance }`;
/// a command without arguments is a unit variant). The method's docs become the
/// variant's docs, and the arguments' attributes (`#[serde(default)]`, `///` docs) move
/// to the variant's fields. The enum derives `Clone`, `Debug`, `PartialEq` and serde's
/// `Serialize` and `Deserialize`.
///
/// All command methods of an aggregate return the same error type, `thalo::Error` or the
/// aggregate's own error type (any `std::error::Error + Send + Sync + 'static`; derive
/// [`macro@ErrorCode`] for it to give its rejections stable codes). A `From` impl is not
/// needed, though one does no harm:
///
/// ```
/// use thalo::{commands, events, Aggregate, Error};
///
/// #[derive(Debug, PartialEq)]
/// pub enum CartError {
///     Empty,
/// }
///
/// impl std::fmt::Display for CartError {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str("the cart is empty")
///     }
/// }
///
/// impl std::error::Error for CartError {}
///
/// impl From<CartError> for Error {
///     fn from(error: CartError) -> Self {
///         Error::domain(error)
///     }
/// }
///
/// #[derive(Aggregate, Clone, Debug)]
/// pub struct Cart {
///     #[identity]
///     id: u64,
///     items: Vec<String>,
/// }
///
/// #[commands]
/// impl Cart {
///     /// Adds items; adding none adds no event.
///     pub fn add(&self, items: Vec<String>) -> Result<Vec<ItemAddedEvent>, CartError> {
///         Ok(items.into_iter().map(|item| ItemAddedEvent { item }).collect())
///     }
///
///     /// Checks out a cart that is not empty.
///     pub fn check_out(&self) -> Result<CheckedOutEvent, CartError> {
///         if self.items.is_empty() {
///             return Err(CartError::Empty);
///         }
///         Ok(CheckedOutEvent {})
///     }
/// }
///
/// #[events]
/// impl Cart {
///     /// An item was added.
///     pub fn item_added(&mut self, item: String) {
///         self.items.push(item);
///     }
///
///     /// The cart was checked out.
///     pub fn checked_out(&mut self) {
///         self.items.clear();
///     }
/// }
///
/// use thalo::Aggregate as _;
///
/// let cart = Cart::new(1);
/// assert_eq!(cart.handle(CartCommand::CheckOut), Err(CartError::Empty));
/// let events = cart.handle(CartCommand::Add { items: vec!["tea".into(), "milk".into()] });
/// assert_eq!(events.unwrap().len(), 2);
/// ```
#[proc_macro_attribute]
pub fn commands(args: TokenStream, input: TokenStream) -> TokenStream {
    match syn::parse::<ItemImpl>(input.clone()) {
        Ok(item) => commands::expand(args.into(), &item).into(),
        Err(_) => fallback::not_an_impl(Kind::Commands, input.into()).into(),
    }
}

/// Generates the event structs and the event enum of an aggregate from its event methods.
///
/// Goes on an inherent impl block of the aggregate. Every `pub` method (including
/// `pub(crate)` and the like) is an event: it
/// takes `&mut self` and owned arguments, changes the aggregate, and returns nothing,
/// since events are facts and cannot fail. Methods that are not `pub` are helpers and
/// are left alone.
///
/// For `impl BankAccount` and `pub fn account_opened(&mut self, initial_balance: f64)`,
/// it generates `pub struct AccountOpenedEvent { pub initial_balance: f64 }` and the
/// variant `BankAccountEvent::AccountOpened(AccountOpenedEvent)`. The method's docs
/// become the struct's docs, and the arguments' attributes move to its fields. The enum
/// implements `thalo::Event` and `From` each event struct.
///
/// # `#[event(...)]`
///
/// - `name = "AccountOpened"`: the stable event type name stored with every event.
///   Defaults to the method's name in PascalCase. Unique within an aggregate.
/// - `version = 2`: the schema version new events are written with. Defaults to 1.
/// - `upcast = path::to::function`: a
///   `fn(u16, serde_json::Value) -> Result<serde_json::Value, thalo::Error>` that turns
///   a payload of an older version into the current shape before it is deserialized
///   (`Self::function` names an associated function of the aggregate). Without it, older
///   payloads must still deserialize, e.g. with `#[serde(default)]` on new fields.
///
/// ```
/// use thalo::__private::serde_json::{self, json, Value};
/// use thalo::{commands, events, Aggregate, Error, Event};
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Account {
///     #[identity]
///     id: String,
///     owner: String,
///     cents: i64,
/// }
///
/// #[commands]
/// impl Account {
///     /// Opens the account.
///     pub fn open(&self, owner: String, cents: i64) -> Result<OpenedEvent, Error> {
///         Ok(OpenedEvent { owner, cents })
///     }
/// }
///
/// #[events]
/// impl Account {
///     /// The account was opened. Version 1 had no `owner`.
///     #[event(name = "AccountOpened", version = 2, upcast = Self::upcast_opened)]
///     pub fn opened(&mut self, owner: String, cents: i64) {
///         self.owner = owner;
///         self.cents = cents;
///     }
/// }
///
/// impl Account {
///     fn upcast_opened(_version: u16, mut payload: Value) -> Result<Value, Error> {
///         payload["owner"] = json!("unknown");
///         Ok(payload)
///     }
/// }
///
/// let event = AccountEvent::from(OpenedEvent { owner: "ada".into(), cents: 5 });
/// assert_eq!((event.event_type(), event.event_version()), ("AccountOpened", 2));
/// assert_eq!(event.encode().unwrap(), r#"{"owner":"ada","cents":5}"#);
///
/// let old = AccountEvent::decode("AccountOpened", 1, r#"{"cents":5}"#).unwrap();
/// assert_eq!(old, AccountEvent::Opened(OpenedEvent { owner: "unknown".into(), cents: 5 }));
/// # let _ = serde_json::Value::Null;
/// ```
#[proc_macro_attribute]
pub fn events(args: TokenStream, input: TokenStream) -> TokenStream {
    match syn::parse::<ItemImpl>(input.clone()) {
        Ok(item) => events::expand(args.into(), &item).into(),
        Err(_) => fallback::not_an_impl(Kind::Events, input.into()).into(),
    }
}
