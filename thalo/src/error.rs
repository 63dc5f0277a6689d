//! The error type shared by every Thalo crate.

use std::borrow::Cow;
use std::fmt;

/// A boxed error that can cross task boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Thalo, from a rejected command to a lost connection.
///
/// Domain failures (a command that breaks an invariant) and infrastructure failures (a
/// database that went away) share this type so that [`Repository::execute`] can return
/// one error. Match on the variant, or use the helpers ([`Error::code`],
/// [`Error::is_conflict`], ...).
///
/// [`Repository::execute`]: crate::Repository::execute
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A command was rejected because it would break a business rule.
    ///
    /// The `code` is stable and meant for programs (`ACCOUNT_ALREADY_OPENED`); the
    /// optional `message` is meant for people.
    #[error("{}", InvariantDisplay { code, message })]
    Invariant {
        /// Stable, machine-readable code.
        code: Cow<'static, str>,
        /// Optional human-readable explanation.
        message: Option<String>,
    },

    /// A command handler returned an error of the aggregate's own error type.
    ///
    /// The `code` is the error's [`ErrorCode`] when its type has one (see
    /// [`Error::coded`]), so that programs can tell rejections apart without knowing the
    /// type; [`Error::code`] returns it.
    #[error("command rejected: {error}")]
    Domain {
        /// The aggregate's error (printed, not returned from `source()`).
        error: BoxError,
        /// The error's stable, machine-readable code, if its type implements
        /// [`ErrorCode`].
        code: Option<Cow<'static, str>>,
    },

    /// An aggregate or resource does not exist.
    #[error("{aggregate_type} `{aggregate_id}` not found")]
    NotFound {
        /// Type name of the aggregate.
        aggregate_type: Cow<'static, str>,
        /// Identity of the aggregate.
        aggregate_id: String,
    },

    /// Optimistic concurrency: another writer appended to the stream first.
    #[error(
        "concurrency conflict on {aggregate_type} `{aggregate_id}`: expected version {expected}{}",
        match actual { Some(actual) => format!(", found {actual}"), None => String::new() }
    )]
    Conflict {
        /// Type name of the aggregate.
        aggregate_type: Cow<'static, str>,
        /// Identity of the aggregate.
        aggregate_id: String,
        /// The version the writer expected the stream to have.
        expected: u64,
        /// The version the stream had, when known.
        actual: Option<u64>,
        /// The driver error that revealed the conflict (a unique violation), if any.
        #[source]
        source: Option<BoxError>,
    },

    /// An event's type name is not known to the event enum it was decoded into.
    #[error("unknown event type `{event_type}` (version {version}) for {target}")]
    UnknownEventType {
        /// The stored type name.
        event_type: String,
        /// The stored schema version.
        version: u16,
        /// The Rust type that was asked to decode it.
        target: &'static str,
    },

    /// An event of an aggregate type that the [`EventSet`](crate::EventSet) it was
    /// decoded into does not hold, or (decoding without the aggregate type, with
    /// [`Event::decode`](crate::Event::decode)) whose type name several aggregates of the
    /// set share (then `aggregate_type` is empty).
    #[error("{}", UnknownAggregateDisplay { aggregate_type, event_type, target })]
    UnknownAggregateType {
        /// The event's aggregate type (empty when it was not given).
        aggregate_type: String,
        /// The stored type name of the event.
        event_type: String,
        /// The Rust type that was asked to decode it.
        target: &'static str,
    },

    /// An event, command or snapshot could not be (de)serialized.
    #[error("could not (de)serialize {what}")]
    Serialization {
        /// What was being (de)serialized, e.g. the event type.
        what: String,
        /// The serializer's error.
        #[source]
        source: BoxError,
    },

    /// The event store failed (connection lost, query error, ...).
    #[error("event store error: {context}")]
    Store {
        /// What the store was doing.
        context: String,
        /// The driver error.
        #[source]
        source: BoxError,
    },

    /// The message broker failed.
    #[error("message broker error: {context}")]
    Broker {
        /// What the broker client was doing.
        context: String,
        /// The client error.
        #[source]
        source: BoxError,
    },

    /// An event handler or projection failed.
    #[error("handler `{handler}` failed")]
    Handler {
        /// Name of the handler or projection.
        handler: String,
        /// The handler's error.
        #[source]
        source: BoxError,
    },

    /// An event is larger than the store accepts (see the Postgres store's
    /// `max_event_bytes`): nothing of the append was stored. Kafka refuses messages
    /// above its size limit, so such an event could be stored but never published.
    #[error(
        "event `{event_type}` of {aggregate_type} `{aggregate_id}` is {size} bytes, more than the limit of {limit} bytes"
    )]
    EventTooLarge {
        /// Type name of the aggregate.
        aggregate_type: Cow<'static, str>,
        /// Identity of the aggregate.
        aggregate_id: String,
        /// The event's type name.
        event_type: String,
        /// Encoded size of the event (payload and metadata), in bytes.
        size: usize,
        /// The store's limit, in bytes.
        limit: usize,
    },

    /// A [`CommandId`](crate::CommandId) was already used for a different command (or
    /// for another aggregate): nothing was stored. A retry must send the same command
    /// under the same key; a new command needs a new key.
    #[error(
        "command id `{command_id}` was already used for a different command (on {aggregate_type} `{aggregate_id}`)"
    )]
    CommandIdReused {
        /// The reused key.
        command_id: String,
        /// Type name of the aggregate the key was first used on.
        aggregate_type: String,
        /// Identity of the aggregate the key was first used on.
        aggregate_id: String,
    },

    /// A string is not a valid [`CommandId`](crate::CommandId).
    #[error("invalid command id: {reason}")]
    InvalidCommandId {
        /// Why it is not valid.
        reason: String,
    },

    /// Invalid configuration or arguments.
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },

    /// Waiting for something took longer than allowed, e.g. for a projection to apply
    /// a command's events ([`Progress::wait_until_projected`](crate::Progress::wait_until_projected)).
    /// Nothing failed: what was waited for may still happen.
    #[error("timed out after {}: {context}", humanize(*timeout))]
    Timeout {
        /// What was waited for.
        context: String,
        /// How long it was waited for.
        timeout: std::time::Duration,
    },
}

fn humanize(duration: std::time::Duration) -> String {
    if duration.as_millis() < 1000 {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

/// An error a command may return: [`Error`] itself, or any error type of the
/// application's (`std::error::Error + Send + Sync + 'static`, such as a `thiserror`
/// enum), which becomes [`Error::Domain`] and can be downcast back with
/// [`Error::downcast_domain`]. No `From` impl is needed.
///
/// [`Repository::execute`](crate::Repository::execute) converts an aggregate's error
/// with [`Aggregate::reject`](crate::Aggregate::reject), which also records the error's
/// [`ErrorCode`] when its type has one (aggregates made with the macros do this by
/// themselves); [`CommandError::into_error`] alone, being implemented for every error
/// type at once, cannot see the code.
///
/// ```
/// use thalo::{commands, events, Aggregate, CommandError};
///
/// #[derive(Debug, PartialEq, thiserror::Error)]
/// pub enum LoanError {
///     #[error("the member is suspended")]
///     Suspended,
/// }
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Loan {
///     #[identity]
///     id: String,
///     suspended: bool,
/// }
///
/// #[commands]
/// impl Loan {
///     pub fn borrow(&self) -> Result<BorrowedEvent, LoanError> {
///         if self.suspended {
///             return Err(LoanError::Suspended);
///         }
///         Ok(BorrowedEvent {})
///     }
/// }
///
/// #[events]
/// impl Loan {
///     pub fn borrowed(&mut self) {}
/// }
///
/// let err = LoanError::Suspended.into_error();
/// assert_eq!(err.downcast_domain::<LoanError>(), Some(&LoanError::Suspended));
/// assert_eq!(err.to_string(), "command rejected: the member is suspended");
/// // `LoanError` has no `ErrorCode`: the rejection has no code.
/// assert_eq!(Loan::reject(LoanError::Suspended).code(), None);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a command's error type: it is not a `std::error::Error + Send + Sync + 'static`",
    label = "`{Self}` does not implement `std::error::Error`",
    note = "derive `thiserror::Error` for `{Self}` (or implement `std::fmt::Display` and `std::error::Error`), or return `thalo::Error`"
)]
pub trait CommandError: fmt::Debug + Send + 'static {
    /// The [`Error`] for this rejection: [`Error::domain`] of it (without a code; see
    /// [`Aggregate::reject`](crate::Aggregate::reject) for the conversion that keeps
    /// one).
    fn into_error(self) -> Error;
}

impl<E> CommandError for E
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn into_error(self) -> Error {
        Error::domain(self)
    }
}

/// A stable, machine-readable code for each value of a domain error, such as
/// `MEMBER_SUSPENDED` for `LoanError::Suspended`.
///
/// A command rejected with such an error reaches the caller as [`Error::Domain`]
/// carrying the code, which [`Error::code`] returns, as it does an invariant's code: an
/// HTTP API answers with it, a test asserts it (`thalo_testing`'s `then_error_code`),
/// and a retry under the same [`CommandId`](crate::CommandId) gets it back (see
/// [`Rejection`](crate::Rejection)). The error's own type is still there for
/// [`Error::downcast_domain`].
///
/// Derive it (`#[derive(thalo::ErrorCode)]`, feature `macros`): each variant of an enum
/// gets its name in `SCREAMING_SNAKE_CASE`, a struct its type's name, and
/// `#[code("...")]` on a variant (or on the struct) sets another. Codes are read by
/// programs, so they must not change when a variant is renamed: pin the old code with
/// `#[code("...")]` then. Aggregates made with the macros pick the code up by
/// themselves; a hand-written [`Aggregate`](crate::Aggregate) overrides
/// [`Aggregate::reject`](crate::Aggregate::reject) with [`Error::coded`].
///
/// The code is a `Cow<'static, str>`: the derive (and most hand-written impls) return a
/// `&'static str` without allocating (`Cow::Borrowed`), while an error that wraps
/// another can pass on a code known only at run time.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use thalo::{commands, events, Aggregate, ErrorCode, InMemoryEventStore, Repository};
///
/// #[derive(Debug, PartialEq, thiserror::Error, ErrorCode)]
/// pub enum LoanError {
///     #[error("the member is suspended")]
///     #[code("MEMBER_SUSPENDED")]
///     Suspended,
///     #[error("the book is already borrowed")]
///     AlreadyBorrowed,
/// }
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Loan {
///     #[identity]
///     id: String,
///     borrowed: bool,
/// }
///
/// #[commands]
/// impl Loan {
///     pub fn borrow(&self) -> Result<BorrowedEvent, LoanError> {
///         if self.borrowed {
///             return Err(LoanError::AlreadyBorrowed);
///         }
///         Ok(BorrowedEvent {})
///     }
/// }
///
/// #[events]
/// impl Loan {
///     pub fn borrowed(&mut self) {
///         self.borrowed = true;
///     }
/// }
///
/// assert_eq!(LoanError::Suspended.code(), "MEMBER_SUSPENDED");
///
/// let repo = Repository::new(InMemoryEventStore::new());
/// let id = "book-1".to_owned();
/// repo.execute::<Loan>(&id, LoanCommand::Borrow).await?;
/// let err = repo.execute::<Loan>(&id, LoanCommand::Borrow).await.unwrap_err();
/// assert_eq!(err.code(), Some("ALREADY_BORROWED"));
/// assert_eq!(err.downcast_domain::<LoanError>(), Some(&LoanError::AlreadyBorrowed));
/// # Ok::<(), thalo::Error>(())
/// # }).unwrap();
/// ```
pub trait ErrorCode {
    /// The code of this value, e.g. `MEMBER_SUSPENDED`: by convention uppercase ASCII
    /// letters, digits and `_`, like invariant codes.
    fn code(&self) -> Cow<'static, str>;
}

/// Shortcuts from a foreign error (a driver's, a client's) to an [`Error`] with context,
/// for the code of projections and handlers:
/// `.store_err("updating balances")?` instead of
/// `.map_err(|e| Error::store("updating balances", e))?`.
///
/// ```
/// use thalo::{Error, ResultExt};
///
/// fn parse_balance(text: &str) -> Result<i64, Error> {
///     text.parse::<i64>().store_err("decoding a balance")
/// }
///
/// let err = parse_balance("ten").unwrap_err();
/// assert!(matches!(err, Error::Store { .. }));
/// assert_eq!(err.to_string(), "event store error: decoding a balance");
/// ```
///
/// The context is only converted into a `String` when there is an error.
pub trait ResultExt<T>: sealed::Sealed {
    /// The error as [`Error::Store`] with `context` (what the code was doing).
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when `self` is an error.
    fn store_err(self, context: impl Into<String>) -> Result<T, Error>;

    /// The error as [`Error::Handler`] of the handler or projection `handler`.
    ///
    /// # Errors
    ///
    /// [`Error::Handler`] when `self` is an error.
    fn handler_err(self, handler: impl Into<String>) -> Result<T, Error>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for std::result::Result<T, E> {
    fn store_err(self, context: impl Into<String>) -> Result<T, Error> {
        self.map_err(|err| Error::store(context, err))
    }

    fn handler_err(self, handler: impl Into<String>) -> Result<T, Error> {
        self.map_err(|err| Error::handler(handler, err))
    }
}

mod sealed {
    pub trait Sealed {}
    impl<T, E> Sealed for std::result::Result<T, E> {}
}

struct InvariantDisplay<'a> {
    code: &'a str,
    message: &'a Option<String>,
}

impl fmt::Display for InvariantDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.message {
            Some(message) => write!(f, "invariant violated: {} ({message})", self.code),
            None => write!(f, "invariant violated: {}", self.code),
        }
    }
}

struct UnknownAggregateDisplay<'a> {
    aggregate_type: &'a str,
    event_type: &'a str,
    target: &'a str,
}

impl fmt::Display for UnknownAggregateDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (aggregate_type, event_type, target) =
            (self.aggregate_type, self.event_type, self.target);
        if aggregate_type.is_empty() {
            write!(
                f,
                "event type `{event_type}` is known to several aggregates of {target}: \
                 decode it with its aggregate type (`Event::decode_from`)"
            )
        } else {
            write!(
                f,
                "aggregate type `{aggregate_type}` (event `{event_type}`) is not in {target}"
            )
        }
    }
}

impl Error {
    /// A broken invariant identified by a stable code.
    ///
    /// ```
    /// let err = thalo::Error::invariant_code("ACCOUNT_ALREADY_OPENED");
    /// assert_eq!(err.code(), Some("ACCOUNT_ALREADY_OPENED"));
    /// assert_eq!(err.to_string(), "invariant violated: ACCOUNT_ALREADY_OPENED");
    /// ```
    pub fn invariant_code(code: impl Into<Cow<'static, str>>) -> Self {
        Error::Invariant {
            code: code.into(),
            message: None,
        }
    }

    /// A broken invariant with a stable code and a message for people.
    ///
    /// ```
    /// let err = thalo::Error::invariant("INSUFFICIENT_FUNDS", "balance is 10, withdrawal is 20");
    /// assert_eq!(err.code(), Some("INSUFFICIENT_FUNDS"));
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invariant violated: INSUFFICIENT_FUNDS (balance is 10, withdrawal is 20)"
    /// );
    /// ```
    pub fn invariant(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Error::Invariant {
            code: code.into(),
            message: Some(message.into()),
        }
    }

    /// Wraps an aggregate's own error type (see [`Aggregate::Error`](crate::Aggregate::Error))
    /// as [`Error::Domain`] without a code; a `thalo::Error` passes through unchanged.
    /// [`Error::coded`] keeps the code of an error that has one.
    ///
    /// ```
    /// #[derive(Debug, PartialEq, thiserror::Error)]
    /// #[error("the account is frozen")]
    /// struct Frozen;
    ///
    /// let err = thalo::Error::domain(Frozen);
    /// assert_eq!(err.downcast_domain::<Frozen>(), Some(&Frozen));
    ///
    /// let invariant = thalo::Error::domain(thalo::Error::invariant_code("CLOSED"));
    /// assert_eq!(invariant.code(), Some("CLOSED"));
    /// ```
    pub fn domain(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        let boxed: BoxError = Box::new(source);
        match boxed.downcast::<Error>() {
            Ok(error) => *error,
            Err(error) => Error::Domain { error, code: None },
        }
    }

    /// Wraps an aggregate's own error type as [`Error::Domain`] with its [`ErrorCode`];
    /// a `thalo::Error` passes through unchanged, as with [`Error::domain`].
    ///
    /// This is what [`Aggregate::reject`](crate::Aggregate::reject) of an aggregate made
    /// with the macros does when its error type implements [`ErrorCode`]; a hand-written
    /// aggregate calls it from its own `reject`.
    ///
    /// ```
    /// use thalo::{Error, ErrorCode};
    ///
    /// #[derive(Debug, PartialEq, thiserror::Error, ErrorCode)]
    /// #[error("the account is frozen")]
    /// struct AccountFrozen;
    ///
    /// let err = Error::coded(AccountFrozen);
    /// assert_eq!(err.code(), Some("ACCOUNT_FROZEN"));
    /// assert_eq!(err.downcast_domain::<AccountFrozen>(), Some(&AccountFrozen));
    /// assert_eq!(err.to_string(), "command rejected: the account is frozen");
    /// ```
    pub fn coded<E>(error: E) -> Self
    where
        E: ErrorCode + std::error::Error + Send + Sync + 'static,
    {
        let code = error.code();
        Error::domain(error).with_domain_code(code)
    }

    /// Sets the code of a [`Error::Domain`]; other errors are returned unchanged.
    pub(crate) fn with_domain_code(self, code: Cow<'static, str>) -> Self {
        match self {
            Error::Domain { error, .. } => Error::Domain {
                error,
                code: Some(code),
            },
            other => other,
        }
    }

    /// A store failure with context.
    pub fn store(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Store {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A broker failure with context.
    pub fn broker(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Broker {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A (de)serialization failure of `what`.
    pub fn serialization(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Serialization {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A handler failure.
    pub fn handler(handler: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Handler {
            handler: handler.into(),
            source: source.into(),
        }
    }

    /// A wait for `context` that gave up after `timeout`.
    pub fn timeout(context: impl Into<String>, timeout: std::time::Duration) -> Self {
        Error::Timeout {
            context: context.into(),
            timeout,
        }
    }

    /// Whether this is a [`Error::Timeout`]: waiting gave up, nothing failed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Invalid configuration.
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    /// The stable code of a rejection: an invariant's code ([`Error::Invariant`]), or
    /// the [`ErrorCode`] of an aggregate's own error ([`Error::Domain`]) when its type
    /// has one. `None` for other errors.
    ///
    /// ```
    /// # use thalo::Error;
    /// assert_eq!(Error::invariant_code("CLOSED").code(), Some("CLOSED"));
    /// assert_eq!(Error::config("no database url").code(), None);
    /// ```
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Invariant { code, .. } => Some(code),
            Error::Domain { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Whether this is an optimistic-concurrency conflict (worth retrying after a reload).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// Whether the command itself was rejected (an invariant or a domain error), as
    /// opposed to an infrastructure failure. Rejections are never retried.
    pub fn is_rejection(&self) -> bool {
        matches!(self, Error::Invariant { .. } | Error::Domain { .. })
    }

    /// The aggregate's own error, if this is a [`Error::Domain`] of type `T`.
    pub fn downcast_domain<T: std::error::Error + 'static>(&self) -> Option<&T> {
        match self {
            Error::Domain { error, .. } => error.downcast_ref::<T>(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("custom failure")]
    struct Custom;

    #[test]
    fn conflict_display_names_versions() {
        let err = Error::Conflict {
            aggregate_type: "bank_account".into(),
            aggregate_id: "a-1".into(),
            expected: 3,
            actual: Some(4),
            source: None,
        };
        assert!(err.is_conflict());
        assert!(!err.is_rejection());
        assert_eq!(
            err.to_string(),
            "concurrency conflict on bank_account `a-1`: expected version 3, found 4"
        );
    }

    #[test]
    fn a_thalo_error_passes_through_domain() {
        let err = Error::domain(Error::invariant("CLOSED", "the account is closed"));
        assert_eq!(err.code(), Some("CLOSED"));
        assert!(matches!(
            Error::domain(Error::config("x")),
            Error::Config { .. }
        ));
        assert_eq!(
            Error::invariant_code("X").into_error().code(),
            Some("X"),
            "CommandError for Error is the identity"
        );
    }

    #[test]
    fn domain_errors_downcast() {
        let err = Error::domain(Custom);
        assert!(err.is_rejection());
        assert!(err.downcast_domain::<Custom>().is_some());
        assert_eq!(err.code(), None);
        assert_eq!(err.to_string(), "command rejected: custom failure");
    }

    #[derive(Debug, PartialEq, thiserror::Error)]
    enum Coded {
        #[error("the member is suspended")]
        Suspended,
        #[error("{0} books are too many")]
        TooMany(u32),
    }

    impl ErrorCode for Coded {
        fn code(&self) -> Cow<'static, str> {
            match self {
                Coded::Suspended => Cow::Borrowed("MEMBER_SUSPENDED"),
                Coded::TooMany(n) => Cow::Owned(format!("TOO_MANY_{n}")),
            }
        }
    }

    #[test]
    fn coded_domain_errors_keep_their_code_and_type() {
        let err = Error::coded(Coded::Suspended);
        assert!(err.is_rejection());
        assert_eq!(err.code(), Some("MEMBER_SUSPENDED"));
        assert_eq!(err.downcast_domain::<Coded>(), Some(&Coded::Suspended));
        assert_eq!(err.to_string(), "command rejected: the member is suspended");
        assert_eq!(Error::coded(Coded::TooMany(3)).code(), Some("TOO_MANY_3"));
        // Without `coded`, the same error has no code.
        assert_eq!(Error::domain(Coded::Suspended).code(), None);
    }

    #[test]
    fn with_domain_code_leaves_other_errors_alone() {
        let err = Error::invariant_code("CLOSED").with_domain_code("OTHER".into());
        assert_eq!(err.code(), Some("CLOSED"));
        let err = Error::domain(Custom).with_domain_code("CUSTOM".into());
        assert_eq!(err.code(), Some("CUSTOM"));
    }

    #[test]
    fn result_ext_adds_context() {
        let failed: std::result::Result<(), std::io::Error> =
            Err(std::io::Error::other("connection reset"));
        let err = failed.store_err("updating balances").unwrap_err();
        assert!(matches!(&err, Error::Store { context, .. } if context == "updating balances"));
        assert_eq!(
            std::error::Error::source(&err).map(ToString::to_string),
            Some("connection reset".to_owned())
        );

        let failed: std::result::Result<(), &str> = Err("no such row");
        let err = failed.handler_err("balances").unwrap_err();
        assert!(matches!(&err, Error::Handler { handler, .. } if handler == "balances"));
        assert_eq!(
            Ok::<u8, std::io::Error>(7).store_err("unused").ok(),
            Some(7)
        );
    }
}
