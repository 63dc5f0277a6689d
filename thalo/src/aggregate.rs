//! Aggregates: the consistency boundary that decides which events a command produces.

use std::fmt::{Debug, Display};

use crate::{CommandError, Error, Event};

/// The stable type name of an aggregate.
///
/// The name is stored with every event and used for topic names, so it must not change
/// when the Rust type is renamed. `#[derive(Aggregate)]` uses the snake case of the struct
/// name (`BankAccount` becomes `bank_account`); override it with
/// `#[aggregate(name = "account")]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an aggregate: it has no aggregate type name",
    label = "not an aggregate",
    note = "derive it (`#[derive(Aggregate)]` with `#[commands]` and `#[events]`) or implement `thalo::Aggregate` and `thalo::AggregateType`"
)]
pub trait AggregateType {
    /// The stable type name, e.g. `bank_account`.
    const TYPE: &'static str;
}

/// An event-sourced aggregate.
///
/// An aggregate is rebuilt by [applying](Aggregate::apply) its past events in order, and
/// decides what happens next by [handling](Aggregate::handle) a command, which returns new
/// events or rejects the command. Handling never changes the aggregate: the events do,
/// once they are stored.
///
/// Usually implemented with `#[derive(Aggregate)]`, `#[commands]` and `#[events]` (see the
/// [crate docs](crate)). Implementing it by hand takes an identity, a command type and an
/// event type that implements [`Event`]:
///
/// ```
/// use thalo::{Aggregate, AggregateType, Error, Event};
///
/// #[derive(Clone, Debug, PartialEq)]
/// pub enum CounterEvent {
///     Incremented { by: u64 },
/// }
///
/// impl Event for CounterEvent {
///     fn event_type(&self) -> &'static str {
///         "Incremented"
///     }
///     fn encode(&self) -> Result<String, Error> {
///         let CounterEvent::Incremented { by } = self;
///         Ok(format!(r#"{{"by":{by}}}"#))
///     }
///     fn decode(event_type: &str, version: u16, payload: &str) -> Result<Self, Error> {
///         #[derive(serde::Deserialize)]
///         struct Incremented {
///             by: u64,
///         }
///         match event_type {
///             "Incremented" => serde_json::from_str::<Incremented>(payload)
///                 .map(|e| CounterEvent::Incremented { by: e.by })
///                 .map_err(|e| Error::serialization(event_type, e)),
///             other => Err(Error::UnknownEventType {
///                 event_type: other.to_owned(),
///                 version,
///                 target: "CounterEvent",
///             }),
///         }
///     }
///     fn event_types() -> &'static [&'static str] {
///         &["Incremented"]
///     }
/// }
///
/// #[derive(Debug, Default)]
/// pub struct Counter {
///     id: u64,
///     value: u64,
/// }
///
/// impl AggregateType for Counter {
///     const TYPE: &'static str = "counter";
/// }
///
/// impl Aggregate for Counter {
///     type Id = u64;
///     type Command = u64;
///     type Event = CounterEvent;
///     type Error = Error;
///
///     fn new(id: u64) -> Self {
///         Counter { id, value: 0 }
///     }
///     fn id(&self) -> &u64 {
///         &self.id
///     }
///     fn handle(&self, by: u64) -> Result<Vec<CounterEvent>, Error> {
///         if by == 0 {
///             return Err(Error::invariant_code("ZERO_INCREMENT"));
///         }
///         Ok(vec![CounterEvent::Incremented { by }])
///     }
///     fn apply(&mut self, event: CounterEvent) {
///         let CounterEvent::Incremented { by } = event;
///         self.value += by;
///     }
/// }
///
/// let mut counter = Counter::new(7);
/// for event in counter.handle(5).unwrap() {
///     counter.apply(event);
/// }
/// assert_eq!(counter.value, 5);
/// assert_eq!(counter.handle(0).unwrap_err().code(), Some("ZERO_INCREMENT"));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an aggregate",
    label = "not an aggregate",
    note = "derive it (`#[derive(Aggregate)]` with `#[commands]` and `#[events]`) or implement `thalo::Aggregate`"
)]
pub trait Aggregate: AggregateType + Sized + Send + Sync + 'static {
    /// The identity of one aggregate instance (`String`, `Uuid`, an integer, a newtype).
    ///
    /// Stores key streams by its `Display` form.
    type Id: Clone + Debug + Display + Send + Sync + 'static;

    /// The commands this aggregate handles. `Debug`, because commands are logged and
    /// an idempotent command is fingerprinted by its `Debug` text
    /// ([`CommandKey`](crate::CommandKey)).
    type Command: Debug + Send + 'static;

    /// The events this aggregate emits and is rebuilt from.
    type Event: Event;

    /// The error that rejects a command: [`Error`], or the application's own error type
    /// (any `std::error::Error + Send + Sync + 'static`, such as a `thiserror` enum), which
    /// becomes [`Error::Domain`] without a `From` impl (see [`CommandError`] and
    /// [`Aggregate::reject`]).
    type Error: CommandError;

    /// A fresh aggregate with no events applied.
    fn new(id: Self::Id) -> Self;

    /// The aggregate's identity.
    fn id(&self) -> &Self::Id;

    /// Decides which events `command` produces, or rejects it. Must not change `self`.
    ///
    /// # Errors
    ///
    /// Returns the aggregate's error when the command breaks an invariant.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Changes the aggregate's state by one event. Must not fail: events are facts.
    fn apply(&mut self, event: Self::Event);

    /// The [`Error`] that [`Repository::execute`](crate::Repository::execute) (and
    /// `thalo_testing`'s `AggregateTest`) return when [`handle`](Aggregate::handle)
    /// rejects a command with `error`.
    ///
    /// The default is [`CommandError::into_error`]: an [`Error`] passes through, any
    /// other error becomes [`Error::Domain`] without a code. `#[derive(Aggregate)]`
    /// overrides it to keep the [`ErrorCode`](crate::ErrorCode) of an error type that
    /// has one, with [`Error::coded`]. A hand-written aggregate whose error type has
    /// codes overrides it the same way:
    ///
    /// ```
    /// # use thalo::{Aggregate, AggregateType, Error, ErrorCode};
    /// #[derive(Debug, PartialEq, thiserror::Error, ErrorCode)]
    /// pub enum CounterError {
    ///     #[error("a counter only goes up")]
    ///     ZeroIncrement,
    /// }
    /// # #[derive(Clone, Debug, PartialEq)]
    /// # pub struct Incremented;
    /// # impl thalo::Event for Incremented {
    /// #     fn event_type(&self) -> &'static str { "Incremented" }
    /// #     fn encode(&self) -> Result<String, Error> { Ok("{}".into()) }
    /// #     fn decode(_: &str, _: u16, _: &str) -> Result<Self, Error> { Ok(Incremented) }
    /// #     fn event_types() -> &'static [&'static str] { &["Incremented"] }
    /// # }
    /// # #[derive(Debug)]
    /// # pub struct Counter(u64);
    /// # impl AggregateType for Counter { const TYPE: &'static str = "counter"; }
    ///
    /// impl Aggregate for Counter {
    ///     type Error = CounterError;
    ///     // ...
    /// #   type Id = u64;
    /// #   type Command = u64;
    /// #   type Event = Incremented;
    /// #   fn new(id: u64) -> Self { Counter(id) }
    /// #   fn id(&self) -> &u64 { &self.0 }
    /// #   fn handle(&self, by: u64) -> Result<Vec<Incremented>, CounterError> {
    /// #       if by == 0 { return Err(CounterError::ZeroIncrement); }
    /// #       Ok(vec![Incremented])
    /// #   }
    /// #   fn apply(&mut self, _: Incremented) {}
    ///
    ///     fn reject(error: CounterError) -> Error {
    ///         Error::coded(error)
    ///     }
    /// }
    ///
    /// let error = Counter(1).handle(0).unwrap_err();
    /// assert_eq!(Counter::reject(error).code(), Some("ZERO_INCREMENT"));
    /// ```
    fn reject(error: Self::Error) -> Error {
        error.into_error()
    }

    /// Serializes the aggregate's state for a snapshot, or `None` when the aggregate does
    /// not support snapshots (the default). `#[aggregate(snapshot)]` implements it with
    /// serde.
    fn to_snapshot(&self) -> Option<Result<String, Error>> {
        None
    }

    /// Restores an aggregate from a snapshot written by [`Aggregate::to_snapshot`].
    ///
    /// # Errors
    ///
    /// Returns an error when the snapshot cannot be decoded (stores then fall back to a
    /// full replay) or when the aggregate does not support snapshots.
    fn from_snapshot(snapshot: &str) -> Result<Self, Error> {
        let _ = snapshot;
        Err(Error::config(format!(
            "aggregate `{}` does not support snapshots",
            Self::TYPE
        )))
    }
}
