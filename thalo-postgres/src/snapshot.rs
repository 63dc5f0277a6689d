//! When to write aggregate snapshots.

use std::collections::HashMap;

use thalo::AggregateType;

/// Which aggregate types get snapshots, and how often.
///
/// With `every(n)` for an aggregate type, [`load`](thalo::EventStore::load) starts from
/// the stream's snapshot (if there is one) and, when it had to replay `n` or more events
/// after it, stores a new snapshot of the loaded state, so no load replays much more than
/// `n` events. Snapshots are an optimisation only: one that cannot be decoded (say, after
/// the aggregate's fields changed) is ignored with a warning and the aggregate is
/// replayed from its first event, then a fresh snapshot replaces it.
///
/// Only aggregates that support snapshots ([`Aggregate::to_snapshot`] returns `Some`,
/// e.g. with `#[aggregate(snapshot)]`) are ever snapshotted; for others the policy only
/// costs a primary-key lookup per load.
///
/// [`Aggregate::to_snapshot`]: thalo::Aggregate::to_snapshot
///
/// ```
/// use thalo_postgres::SnapshotPolicy;
///
/// let policy = SnapshotPolicy::never()
///     .with_type("bank_account", 100)
///     .with_type("audit_log", 0); // 0 turns snapshots off for a type
/// assert_eq!(policy.every("bank_account"), Some(100));
/// assert_eq!(policy.every("audit_log"), None);
/// assert_eq!(policy.every("customer"), None);
/// assert_eq!(SnapshotPolicy::every_n(500).every("customer"), Some(500));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotPolicy {
    default: u64,
    per_type: HashMap<String, u64>,
}

impl SnapshotPolicy {
    /// No snapshots (the default).
    pub fn never() -> Self {
        Self::default()
    }

    /// A snapshot every `n` events for every aggregate type (0: never).
    pub fn every_n(n: u64) -> Self {
        SnapshotPolicy {
            default: n,
            per_type: HashMap::new(),
        }
    }

    /// A snapshot every `n` events for the aggregate type named `aggregate_type`
    /// (0: never), overriding the default.
    #[must_use]
    pub fn with_type(mut self, aggregate_type: impl Into<String>, n: u64) -> Self {
        self.per_type.insert(aggregate_type.into(), n);
        self
    }

    /// [`with_type`](SnapshotPolicy::with_type) for aggregate `A`.
    #[must_use]
    pub fn with<A: AggregateType>(self, n: u64) -> Self {
        self.with_type(A::TYPE, n)
    }

    /// How many replayed events trigger a new snapshot of `aggregate_type`, if any.
    pub fn every(&self, aggregate_type: &str) -> Option<u64> {
        let n = self
            .per_type
            .get(aggregate_type)
            .copied()
            .unwrap_or(self.default);
        (n > 0).then_some(n)
    }
}
