//! Idempotent commands: a key per command, recorded with the events it stored.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Error, EventEnvelope};

/// The idempotency key of a command.
///
/// A command executed with a key ([`Repository::execute_once`]) stores its events and
/// the key together, atomically. Executing the same key again (a client retrying after a
/// timeout, a process manager replaying an event) stores nothing and returns the events
/// the first execution stored, even when the two executions race, run in different
/// processes, or the first one's answer was lost. Executing a *different* command under
/// a key already used is [`Error::CommandIdReused`].
///
/// A key is 1 to [`CommandId::MAX_LEN`] bytes of printable ASCII (`!` to `~`), so an HTTP
/// `Idempotency-Key` header fits as is, and so does a UUID:
///
/// ```
/// use thalo::CommandId;
///
/// let key = CommandId::new("order-42/charge").unwrap();
/// assert_eq!(key.as_str(), "order-42/charge");
/// assert!(CommandId::new("").is_err());
/// assert!(CommandId::new("has space").is_err());
/// ```
///
/// A command caused by an event gets a key derived from that event, so replaying the
/// event issues the same key and the command is not executed twice; see
/// [`CommandId::caused_by`].
///
/// [`Repository::execute_once`]: crate::Repository::execute_once
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommandId(String);

impl CommandId {
    /// The longest key, in bytes.
    pub const MAX_LEN: usize = 200;

    /// A key from a client-supplied string.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidCommandId`] when `key` is empty, longer than
    /// [`CommandId::MAX_LEN`] bytes, or has a character outside printable ASCII.
    pub fn new(key: impl Into<String>) -> Result<Self, Error> {
        let key = key.into();
        let reason = if key.is_empty() {
            Some("it is empty".to_owned())
        } else if key.len() > Self::MAX_LEN {
            Some(format!(
                "it is {} bytes long, more than {}",
                key.len(),
                Self::MAX_LEN
            ))
        } else {
            key.chars().find(|c| !c.is_ascii_graphic()).map(|bad| {
                format!("it contains {bad:?}; only printable ASCII without spaces is allowed")
            })
        };
        match reason {
            Some(reason) => Err(Error::InvalidCommandId { reason }),
            None => Ok(CommandId(key)),
        }
    }

    /// A random key (a UUID v4), for a caller that generates its key once and keeps it
    /// for its retries.
    pub fn random() -> Self {
        Self::from(Uuid::new_v4())
    }

    /// The key of the command that `envelope`'s event causes in `step`: the same event
    /// and step always give the same key (a UUID v5 in the event id's namespace), and
    /// different steps of one event give different keys.
    ///
    /// ```
    /// # use thalo::{CommandId, EventEnvelope, Metadata};
    /// # let envelope = EventEnvelope {
    /// #     id: uuid::Uuid::now_v7(), aggregate_type: "transfer".into(),
    /// #     aggregate_id: "t-1".into(), sequence: 1, position: 1,
    /// #     timestamp: chrono::Utc::now(), metadata: Metadata::new(), event: (),
    /// # };
    /// let withdraw = CommandId::caused_by(&envelope, "withdraw");
    /// assert_eq!(withdraw, CommandId::caused_by(&envelope, "withdraw"));
    /// assert_ne!(withdraw, CommandId::caused_by(&envelope, "deposit"));
    /// ```
    pub fn caused_by<E>(envelope: &EventEnvelope<E>, step: &str) -> Self {
        Self::from(Uuid::new_v5(&envelope.id, step.as_bytes()))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Uuid> for CommandId {
    fn from(id: Uuid) -> Self {
        CommandId(id.to_string())
    }
}

impl TryFrom<String> for CommandId {
    type Error = Error;

    fn try_from(key: String) -> Result<Self, Error> {
        Self::new(key)
    }
}

impl From<CommandId> for String {
    fn from(id: CommandId) -> Self {
        id.0
    }
}

impl std::str::FromStr for CommandId {
    type Err = Error;

    fn from_str(key: &str) -> Result<Self, Error> {
        Self::new(key)
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a store needs to execute a command once: its key and a fingerprint of the
/// command, which tells a retry of the same command (same fingerprint) from another
/// command under the same key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandKey {
    /// The idempotency key.
    pub id: CommandId,
    /// A fingerprint of the command ([`CommandKey::fingerprint_of`]).
    pub fingerprint: i64,
}

impl CommandKey {
    /// The key of `command` under `id`.
    pub fn new<C: fmt::Debug>(id: CommandId, command: &C) -> Self {
        CommandKey {
            id,
            fingerprint: Self::fingerprint_of(command),
        }
    }

    /// A fingerprint of a command: a 64-bit FNV-1a hash of its `Debug` text. It is the
    /// same in every process that runs the same code; a command whose `Debug` text
    /// changes between two executions (a field added by a deploy in between, or a
    /// `HashMap` field, whose order varies) counts as a different command.
    pub fn fingerprint_of<C: fmt::Debug>(command: &C) -> i64 {
        struct Fnv(u64);
        impl fmt::Write for Fnv {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for byte in s.bytes() {
                    self.0 ^= u64::from(byte);
                    self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
                }
                Ok(())
            }
        }
        let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
        // Writing to `Fnv` cannot fail; a `Debug` impl that reports an error leaves a
        // partial hash, which is still deterministic.
        let _ = fmt::write(&mut hash, format_args!("{command:?}"));
        i64::from_ne_bytes(hash.0.to_ne_bytes())
    }
}

/// The outcome of a command executed with a [`CommandId`].
#[derive(Clone, Debug, PartialEq)]
pub enum Once<E> {
    /// This execution stored the events (none when the command decided on no change).
    Stored(Vec<EventEnvelope<E>>),
    /// The key was already recorded: nothing was stored, and these are the events the
    /// first execution stored.
    Replayed(Vec<EventEnvelope<E>>),
}

impl<E> Once<E> {
    /// The events, stored now or before.
    pub fn events(&self) -> &[EventEnvelope<E>] {
        match self {
            Once::Stored(events) | Once::Replayed(events) => events,
        }
    }

    /// The events, stored now or before.
    pub fn into_events(self) -> Vec<EventEnvelope<E>> {
        match self {
            Once::Stored(events) | Once::Replayed(events) => events,
        }
    }

    /// Whether the command had already been executed under its key.
    pub fn is_replayed(&self) -> bool {
        matches!(self, Once::Replayed(_))
    }
}

/// A command's rejection as stores record it: a retry of a rejected command under its
/// key gets the same rejection, so that the first execution and any retry agree on one
/// outcome even when they race.
///
/// Only a code and a text are recorded, never the aggregate's own error type, so a
/// replay returns (the same in every store, the in-memory one and Postgres alike):
///
/// | first execution | recorded | replay |
/// |---|---|---|
/// | [`Error::Invariant`] `{ code, message }` | `code`, `message` | [`Error::Invariant`] `{ code, message }` |
/// | [`Error::Domain`] with a code ([`ErrorCode`](crate::ErrorCode)) | the code, the error's text | [`Error::Invariant`] `{ code, message: Some(text) }` |
/// | [`Error::Domain`] without a code | the error's text | [`Error::Domain`] around a [`ReplayedRejection`] with the text |
///
/// A replay therefore has the same [`Error::code`] and [`Error::is_rejection`] as the
/// first execution, which is what an API answers with; only
/// [`Error::downcast_domain`] to the aggregate's error type, and the `Display` text of
/// a coded domain error (`invariant violated: CODE (text)` instead of
/// `command rejected: text`), tell them apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The invariant code ([`Error::Invariant`]), or the code of an aggregate's own
    /// error ([`Error::Domain`]) when its type has one; `None` for a domain error
    /// without a code.
    pub code: Option<String>,
    /// The invariant's message, or the domain error's text.
    pub message: Option<String>,
}

impl Rejection {
    /// The rejection recorded for `error`, if it is one ([`Error::is_rejection`]).
    ///
    /// ```
    /// use thalo::{Error, Rejection};
    ///
    /// let recorded = Rejection::of(&Error::invariant("CLOSED", "the account is closed"));
    /// let replayed = recorded.expect("a rejection").into_error();
    /// assert_eq!(replayed.code(), Some("CLOSED"));
    /// assert!(Rejection::of(&Error::config("not a rejection")).is_none());
    /// ```
    pub fn of(error: &Error) -> Option<Rejection> {
        match error {
            Error::Invariant { code, message } => Some(Rejection {
                code: Some(code.to_string()),
                message: message.clone(),
            }),
            Error::Domain { error, code } => Some(Rejection {
                code: code.as_deref().map(str::to_owned),
                message: Some(error.to_string()),
            }),
            _ => None,
        }
    }

    /// The error a replay returns: [`Error::Invariant`] with the recorded code and
    /// message (also for a domain error that had a code), or [`Error::Domain`] around
    /// a [`ReplayedRejection`] (see the table on [`Rejection`]).
    pub fn into_error(self) -> Error {
        match self.code {
            Some(code) => Error::Invariant {
                code: code.into(),
                message: self.message,
            },
            None => Error::Domain {
                error: Box::new(ReplayedRejection {
                    message: self.message.unwrap_or_default(),
                }),
                code: None,
            },
        }
    }
}

/// The replayed rejection of an aggregate's own error type: its text, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ReplayedRejection {
    /// The original error's text.
    pub message: String,
}

/// What the first execution of a command key did, as the store recorded it.
#[derive(Clone, Debug, PartialEq)]
pub enum Recorded<E> {
    /// It stored these events (none when it decided on no change).
    Stored(Vec<EventEnvelope<E>>),
    /// It was rejected.
    Rejected(Rejection),
}

impl<E> Recorded<E> {
    /// The outcome of a replay: the recorded events, or the recorded rejection.
    ///
    /// # Errors
    ///
    /// The recorded rejection.
    pub fn into_replay(self) -> Result<Once<E>, Error> {
        match self {
            Recorded::Stored(events) => Ok(Once::Replayed(events)),
            Recorded::Rejected(rejection) => Err(rejection.into_error()),
        }
    }
}

/// How long stores keep a command's key by default: 7 days. After that, the key is
/// forgotten and executing it again executes the command again.
pub const DEFAULT_COMMAND_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::{Aggregate, AggregateType, ErrorCode, Event, InMemoryEventStore, Repository};

    #[derive(Debug, PartialEq, thiserror::Error)]
    #[error("the lock is jammed")]
    struct Jammed;

    impl ErrorCode for Jammed {
        fn code(&self) -> Cow<'static, str> {
            Cow::Borrowed("LOCK_JAMMED")
        }
    }

    #[test]
    fn a_coded_domain_error_is_recorded_and_replayed_with_its_code() {
        let rejection = Rejection::of(&Error::coded(Jammed)).expect("a rejection");
        assert_eq!(
            rejection,
            Rejection {
                code: Some("LOCK_JAMMED".to_owned()),
                message: Some("the lock is jammed".to_owned()),
            }
        );
        let replayed = rejection.into_error();
        assert!(replayed.is_rejection());
        assert_eq!(replayed.code(), Some("LOCK_JAMMED"));
        assert!(matches!(
            &replayed,
            Error::Invariant { message: Some(message), .. } if message == "the lock is jammed"
        ));
    }

    #[test]
    fn an_uncoded_domain_error_is_replayed_as_its_text() {
        let rejection = Rejection::of(&Error::domain(Jammed)).expect("a rejection");
        assert_eq!(rejection.code, None);
        let replayed = rejection.into_error();
        assert_eq!(replayed.code(), None);
        assert_eq!(
            replayed.downcast_domain::<ReplayedRejection>(),
            Some(&ReplayedRejection {
                message: "the lock is jammed".to_owned()
            })
        );
        assert_eq!(replayed.to_string(), Error::domain(Jammed).to_string());
    }

    #[derive(Clone, Debug, PartialEq)]
    struct Opened;

    impl Event for Opened {
        fn event_type(&self) -> &'static str {
            "Opened"
        }
        fn encode(&self) -> Result<String, Error> {
            Ok("{}".to_owned())
        }
        fn decode(_: &str, _: u16, _: &str) -> Result<Self, Error> {
            Ok(Opened)
        }
        fn event_types() -> &'static [&'static str] {
            &["Opened"]
        }
    }

    /// A hand-written aggregate whose error type has codes.
    #[derive(Debug)]
    struct Lock {
        id: u32,
    }

    impl AggregateType for Lock {
        const TYPE: &'static str = "lock";
    }

    impl Aggregate for Lock {
        type Id = u32;
        type Command = ();
        type Event = Opened;
        type Error = Jammed;
        fn new(id: u32) -> Self {
            Lock { id }
        }
        fn id(&self) -> &u32 {
            &self.id
        }
        fn handle(&self, (): ()) -> Result<Vec<Opened>, Jammed> {
            Err(Jammed)
        }
        fn apply(&mut self, _: Opened) {}
        fn reject(error: Jammed) -> Error {
            Error::coded(error)
        }
    }

    #[test]
    fn a_retry_gets_the_code_of_the_first_rejection() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let repo = Repository::new(InMemoryEventStore::new());
            let key = CommandId::random();
            let first = repo
                .execute_once::<Lock>(&1, key.clone(), ())
                .await
                .expect_err("jammed");
            assert_eq!(first.code(), Some("LOCK_JAMMED"));
            assert_eq!(first.downcast_domain::<Jammed>(), Some(&Jammed));
            let retry = repo
                .execute_once::<Lock>(&1, key, ())
                .await
                .expect_err("jammed, replayed");
            assert_eq!(retry.code(), Some("LOCK_JAMMED"));
            assert!(retry.is_rejection());
        });
    }
}
