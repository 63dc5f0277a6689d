//! Given / when / then for aggregates.

use std::fmt::{self, Debug, Write as _};

use similar::{ChangeTag, TextDiff};
use thalo::{Aggregate, Error, Event};

/// An aggregate under test: build its past with [`given`](AggregateTest::given), run a
/// command with [`when`](AggregateTest::when), check the [`Outcome`].
///
/// Every event, given or produced, goes through [`Event::encode`] and
/// [`Event::decode`] on the way, so an event that would not survive the store fails the
/// test here.
pub struct AggregateTest<A: Aggregate> {
    aggregate: A,
    version: u64,
}

impl<A: Aggregate + Debug> Debug for AggregateTest<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateTest")
            .field("aggregate", &self.aggregate)
            .field("version", &self.version)
            .finish()
    }
}

impl<A: Aggregate> AggregateTest<A> {
    /// A fresh aggregate with no events.
    pub fn new(id: A::Id) -> Self {
        AggregateTest {
            aggregate: A::new(id),
            version: 0,
        }
    }

    /// Applies past events, in order.
    ///
    /// # Panics
    ///
    /// Panics when an event does not survive a JSON round trip.
    #[must_use]
    #[track_caller]
    pub fn given<I>(mut self, events: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<A::Event>,
    {
        for event in events {
            let event = round_trip(event.into());
            self.aggregate.apply(event);
            self.version += 1;
        }
        self
    }

    /// The aggregate as built so far.
    pub fn aggregate(&self) -> &A {
        &self.aggregate
    }

    /// Handles `command` and captures the result.
    pub fn when(self, command: A::Command) -> Outcome<A> {
        let result = self
            .aggregate
            .handle(command)
            .map_err(A::reject)
            .map(|events| events.into_iter().map(round_trip).collect());
        Outcome {
            aggregate: self.aggregate,
            result,
        }
    }
}

/// What a command did: events or an error.
pub struct Outcome<A: Aggregate> {
    aggregate: A,
    result: Result<Vec<A::Event>, Error>,
}

impl<A: Aggregate + Debug> Debug for Outcome<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("aggregate", &self.aggregate)
            .field("result", &self.result)
            .finish()
    }
}

impl<A: Aggregate> Outcome<A>
where
    A::Event: PartialEq,
{
    /// Asserts the command produced exactly `expected`, in order, and applies them.
    ///
    /// # Panics
    ///
    /// Panics with a diff of expected and actual events when they differ, or with the
    /// error when the command was rejected.
    #[track_caller]
    pub fn then_events<I>(mut self, expected: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<A::Event>,
    {
        let expected: Vec<A::Event> = expected.into_iter().map(Into::into).collect();
        match &self.result {
            Ok(actual) if *actual == expected => {
                for event in actual.iter().cloned() {
                    self.aggregate.apply(event);
                }
                self
            }
            Ok(actual) => panic!(
                "the command produced other events than expected:\n{}",
                diff(&expected, actual)
            ),
            Err(err) => panic!(
                "expected events {expected:#?}\nbut the command was rejected: {err} ({err:?})"
            ),
        }
    }

    /// Asserts the command succeeded without producing events.
    ///
    /// # Panics
    ///
    /// Panics when it produced events or was rejected.
    #[track_caller]
    pub fn then_no_events(self) -> Self {
        self.then_events(std::iter::empty::<A::Event>())
    }
}

impl<A: Aggregate> Outcome<A> {
    /// Asserts the command was rejected with the error code `code` ([`Error::code`]):
    /// an invariant's code, or the [`ErrorCode`](thalo::ErrorCode) of the aggregate's
    /// own error type.
    ///
    /// # Panics
    ///
    /// Panics when the command succeeded, was rejected with another code, or failed
    /// without a code (for a domain error whose type has no `ErrorCode`, the message
    /// says so).
    #[track_caller]
    pub fn then_error_code(self, code: &str) {
        match self.result {
            Err(err) if err.code() == Some(code) => {}
            Err(Error::Domain { error, code: None }) => panic!(
                "expected the error code `{code}`, but the command was rejected with a domain \
                 error that has no code: {error} ({error:?}); implement or derive \
                 `thalo::ErrorCode` for its type (a hand-written `Aggregate` also returns \
                 `Error::coded(error)` from `reject`), or assert it with `then_domain_error`"
            ),
            Err(err) => match err.code() {
                Some(other) => panic!(
                    "expected the error code `{code}`, but the command was rejected with the \
                     code `{other}`: {err} ({err:?})"
                ),
                None => panic!(
                    "expected the error code `{code}`, but the command failed with an error \
                     that has no code: {err} ({err:?})"
                ),
            },
            Ok(events) => panic!(
                "expected the error code `{code}`, but the command succeeded with the events \
                 {events:#?}"
            ),
        }
    }

    /// Asserts the command was rejected with exactly `expected`, an error of the
    /// aggregate's own type ([`Error::downcast_domain`]), e.g.
    /// `.then_domain_error(LoanError::Suspended)`.
    ///
    /// # Panics
    ///
    /// Panics when the command succeeded, was rejected with another value of `E`, or
    /// failed with an error that is not an `E`.
    #[track_caller]
    pub fn then_domain_error<E>(self, expected: E)
    where
        E: std::error::Error + PartialEq + Debug + 'static,
    {
        match self.result {
            Err(err) => match err.downcast_domain::<E>() {
                Some(actual) if *actual == expected => {}
                Some(actual) => panic!(
                    "expected the command to be rejected with {expected:?}, but it was \
                     rejected with {actual:?} ({actual})"
                ),
                None => panic!(
                    "expected the command to be rejected with {expected:?} (a `{}`), but it \
                     failed with another error: {err} ({err:?})",
                    std::any::type_name::<E>()
                ),
            },
            Ok(events) => panic!(
                "expected the command to be rejected with {expected:?}, but it succeeded with \
                 the events {events:#?}"
            ),
        }
    }

    /// Asserts the command was rejected and passes the error to `check`.
    ///
    /// # Panics
    ///
    /// Panics when the command succeeded, or when `check` does.
    #[track_caller]
    pub fn then_error(self, check: impl FnOnce(&Error)) {
        match self.result {
            Err(err) => check(&err),
            Ok(events) => panic!("expected an error, but the command produced {events:#?}"),
        }
    }

    /// Passes the aggregate (with the produced events applied, after
    /// [`then_events`](Outcome::then_events)) to `check`.
    #[track_caller]
    pub fn then_state(self, check: impl FnOnce(&A)) -> Self {
        check(&self.aggregate);
        self
    }

    /// The produced events, or the error.
    ///
    /// # Errors
    ///
    /// The command's rejection.
    pub fn into_result(self) -> Result<Vec<A::Event>, Error> {
        self.result
    }
}

#[track_caller]
fn round_trip<E: Event>(event: E) -> E {
    let payload = event
        .encode()
        .unwrap_or_else(|err| panic!("event {event:?} does not serialize: {err}"));
    E::decode(event.event_type(), event.event_version(), &payload).unwrap_or_else(|err| {
        panic!("event {event:?} does not deserialize from its own payload {payload}: {err}")
    })
}

fn diff<E: Debug>(expected: &[E], actual: &[E]) -> String {
    let expected = format!("{expected:#?}");
    let actual = format!("{actual:#?}");
    let mut out = String::from("--- expected\n+++ actual\n");
    for change in TextDiff::from_lines(&expected, &actual).iter_all_changes() {
        let sign = match change.tag() {
            ChangeTag::Delete => '-',
            ChangeTag::Insert => '+',
            ChangeTag::Equal => ' ',
        };
        let _ = write!(out, "{sign}{change}");
    }
    out
}

#[cfg(test)]
mod tests {
    use thalo::{commands, events, Aggregate, Error, ErrorCode};

    use super::{diff, AggregateTest};

    #[derive(Debug, PartialEq, thiserror::Error, ErrorCode)]
    pub enum LoanError {
        #[error("the member is suspended")]
        #[code("MEMBER_SUSPENDED")]
        Suspended,
        #[error("{0} books are too many")]
        TooManyBooks(u32),
    }

    /// Uncoded: a plain `thiserror` type.
    #[derive(Debug, PartialEq, thiserror::Error)]
    #[error("the shelf is full")]
    pub struct ShelfFull;

    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Loan {
        #[identity]
        id: u64,
        books: u32,
    }

    #[commands]
    impl Loan {
        pub fn borrow(&self, books: u32, suspended: bool) -> Result<BorrowedEvent, LoanError> {
            if suspended {
                return Err(LoanError::Suspended);
            }
            if self.books + books > 3 {
                return Err(LoanError::TooManyBooks(self.books + books));
            }
            Ok(BorrowedEvent { books })
        }
    }

    #[events]
    impl Loan {
        pub fn borrowed(&mut self, books: u32) {
            self.books += books;
        }
    }

    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Shelf {
        #[identity]
        id: u64,
    }

    #[commands]
    impl Shelf {
        pub fn fill(&self) -> Result<FilledEvent, ShelfFull> {
            Err(ShelfFull)
        }
    }

    #[events]
    impl Shelf {
        pub fn filled(&mut self) {}
    }

    /// Returns `thalo::Error`, a coded domain error inside.
    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Desk {
        #[identity]
        id: u64,
    }

    #[commands]
    impl Desk {
        pub fn lend(&self, coded: bool) -> Result<LentEvent, Error> {
            if coded {
                return Err(Error::coded(LoanError::Suspended));
            }
            Err(Error::invariant_code("DESK_CLOSED"))
        }
    }

    #[events]
    impl Desk {
        pub fn lent(&mut self) {}
    }

    fn borrow(books: u32, suspended: bool) -> LoanCommand {
        LoanCommand::Borrow { books, suspended }
    }

    #[test]
    fn then_error_code_reads_a_domain_errors_code() {
        AggregateTest::<Loan>::new(1)
            .when(borrow(1, true))
            .then_error_code("MEMBER_SUSPENDED");
        AggregateTest::<Loan>::new(1)
            .given([BorrowedEvent { books: 3 }])
            .when(borrow(1, false))
            .then_error_code("TOO_MANY_BOOKS");
    }

    #[test]
    fn a_thalo_error_keeps_its_code() {
        AggregateTest::<Desk>::new(1)
            .when(DeskCommand::Lend { coded: true })
            .then_error_code("MEMBER_SUSPENDED");
        AggregateTest::<Desk>::new(1)
            .when(DeskCommand::Lend { coded: true })
            .then_domain_error(LoanError::Suspended);
        AggregateTest::<Desk>::new(1)
            .when(DeskCommand::Lend { coded: false })
            .then_error_code("DESK_CLOSED");
    }

    #[test]
    #[should_panic(
        expected = "a domain error that has no code: the shelf is full (ShelfFull); \
                               implement or derive `thalo::ErrorCode` for its type"
    )]
    fn then_error_code_on_an_uncoded_domain_error_says_what_to_do() {
        AggregateTest::<Shelf>::new(1)
            .when(ShelfCommand::Fill)
            .then_error_code("SHELF_FULL");
    }

    #[test]
    #[should_panic(
        expected = "expected the error code `TOO_MANY_BOOKS`, but the command was \
                               rejected with the code `MEMBER_SUSPENDED`"
    )]
    fn then_error_code_names_the_other_code() {
        AggregateTest::<Loan>::new(1)
            .when(borrow(1, true))
            .then_error_code("TOO_MANY_BOOKS");
    }

    #[test]
    #[should_panic(
        expected = "expected the error code `MEMBER_SUSPENDED`, but the command \
                               succeeded with the events"
    )]
    fn then_error_code_on_success() {
        AggregateTest::<Loan>::new(1)
            .when(borrow(1, false))
            .then_error_code("MEMBER_SUSPENDED");
    }

    #[test]
    fn then_domain_error_matches_the_value() {
        AggregateTest::<Loan>::new(1)
            .given([BorrowedEvent { books: 2 }])
            .when(borrow(2, false))
            .then_domain_error(LoanError::TooManyBooks(4));
        AggregateTest::<Shelf>::new(1)
            .when(ShelfCommand::Fill)
            .then_domain_error(ShelfFull);
    }

    #[test]
    #[should_panic(
        expected = "expected the command to be rejected with TooManyBooks(3), but \
                               it was rejected with TooManyBooks(4) (4 books are too many)"
    )]
    fn then_domain_error_on_another_value() {
        AggregateTest::<Loan>::new(1)
            .given([BorrowedEvent { books: 2 }])
            .when(borrow(2, false))
            .then_domain_error(LoanError::TooManyBooks(3));
    }

    #[test]
    #[should_panic(expected = "expected the command to be rejected with ShelfFull (a \
                               `thalo_testing::aggregate_test::tests::ShelfFull`), but it \
                               failed with another error: command rejected: the member is \
                               suspended")]
    fn then_domain_error_on_another_type() {
        AggregateTest::<Loan>::new(1)
            .when(borrow(1, true))
            .then_domain_error(ShelfFull);
    }

    #[test]
    #[should_panic(
        expected = "expected the command to be rejected with Suspended, but it \
                               succeeded with the events [\n    Borrowed("
    )]
    fn then_domain_error_on_success() {
        AggregateTest::<Loan>::new(1)
            .when(borrow(1, false))
            .then_domain_error(LoanError::Suspended);
    }

    #[test]
    fn diff_marks_changed_lines() {
        let out = diff(&[1, 2], &[1, 3]);
        assert!(out.contains("-    2,"), "{out}");
        assert!(out.contains("+    3,"), "{out}");
        assert!(out.contains("     1,"), "{out}");
    }
}
