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
            .map_err(thalo::CommandError::into_error)
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
    /// Asserts the command was rejected with the invariant `code`.
    ///
    /// # Panics
    ///
    /// Panics when the command succeeded or failed otherwise.
    #[track_caller]
    pub fn then_error_code(self, code: &str) {
        match self.result {
            Err(err) if err.code() == Some(code) => {}
            Err(err) => {
                panic!("expected the invariant code `{code}`, got the error: {err} ({err:?})")
            }
            Ok(events) => {
                panic!("expected the invariant code `{code}`, but the command produced {events:#?}")
            }
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
    use super::diff;

    #[test]
    fn diff_marks_changed_lines() {
        let out = diff(&[1, 2], &[1, 3]);
        assert!(out.contains("-    2,"), "{out}");
        assert!(out.contains("+    3,"), "{out}");
        assert!(out.contains("     1,"), "{out}");
    }
}
