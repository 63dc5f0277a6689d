//! Checking that `apply` is total (feature `proptest`).

use std::fmt::Debug;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestRunner};
use thalo::Aggregate;

/// Replays generated event sequences on a fresh aggregate and panics, with the smallest
/// sequence that fails, when `apply` panics on one.
///
/// `apply` runs for every stored event on every load, so it must accept any event the
/// aggregate could ever have stored: validation belongs in commands, and an `apply`
/// that panics (an overflow, an `unwrap`, an index) makes the aggregate unloadable for
/// good. `events` generates single events; sequences of up to `max_len` of them are
/// replayed, 256 of them by default (`PROPTEST_CASES` changes it).
///
/// ```
/// use proptest::prelude::*;
/// use thalo::{commands, events, Aggregate, Error};
///
/// #[derive(Aggregate, Clone, Debug, Default)]
/// pub struct Counter {
///     #[identity]
///     id: u64,
///     value: i64,
/// }
///
/// #[commands]
/// impl Counter {
///     pub fn add(&self, by: i64) -> Result<AddedEvent, Error> {
///         Ok(AddedEvent { by })
///     }
/// }
///
/// #[events]
/// impl Counter {
///     pub fn added(&mut self, by: i64) {
///         self.value = self.value.saturating_add(by); // `+=` would fail the check
///     }
/// }
///
/// thalo_testing::assert_apply_is_total::<Counter>(
///     1,
///     any::<i64>().prop_map(|by| CounterEvent::from(AddedEvent { by })),
///     16,
/// );
/// ```
///
/// # Panics
///
/// When `apply` panics on a generated sequence (that is the point).
pub fn assert_apply_is_total<A>(id: A::Id, events: impl Strategy<Value = A::Event>, max_len: usize)
where
    A: Aggregate,
    A::Id: Clone + Debug,
    A::Event: Debug,
{
    let mut runner = TestRunner::new(Config::default());
    let sequences = proptest::collection::vec(events, 0..=max_len);
    let result = runner.run(&sequences, |sequence| {
        let mut aggregate = A::new(id.clone());
        for event in sequence {
            aggregate.apply(event);
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!(
            "`apply` of `{}` is not total: {failure}",
            <A as thalo::AggregateType>::TYPE
        );
    }
}
