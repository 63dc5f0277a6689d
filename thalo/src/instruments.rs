//! The metrics the core records, through the `metrics` facade (see the crate docs'
//! "Metrics" section for the table).
//!
//! Label values are `&'static str` (aggregate types, outcomes) wherever possible, so a
//! metric costs no string formatting; without an installed recorder every call is a
//! no-op.

use std::time::Instant;

use crate::Error;

/// `thalo_commands_total{aggregate_type, outcome}`.
pub(crate) const COMMANDS: &str = "thalo_commands_total";
/// `thalo_command_duration_seconds{aggregate_type}`.
pub(crate) const COMMAND_DURATION: &str = "thalo_command_duration_seconds";
/// `thalo_command_conflicts_total{aggregate_type}`.
pub(crate) const COMMAND_CONFLICTS: &str = "thalo_command_conflicts_total";
/// `thalo_cache_hits_total{aggregate_type}`.
pub(crate) const CACHE_HITS: &str = "thalo_cache_hits_total";
/// `thalo_cache_misses_total{aggregate_type}`.
pub(crate) const CACHE_MISSES: &str = "thalo_cache_misses_total";
/// `thalo_projection_position{projection}`.
pub(crate) const PROJECTION_POSITION: &str = "thalo_projection_position";
/// `thalo_projection_lag_events{projection}`.
pub(crate) const PROJECTION_LAG: &str = "thalo_projection_lag_events";
/// `thalo_projection_lag_seconds{projection}`.
pub(crate) const PROJECTION_LAG_SECONDS: &str = "thalo_projection_lag_seconds";

/// How a command ended, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CommandOutcome {
    /// Decided and stored (possibly no events).
    Stored,
    /// A retry under a used idempotency key, answered from the record.
    Replayed,
    /// Rejected by the aggregate (an invariant or a domain error).
    Rejected,
    /// Still conflicting after the last attempt.
    ConflictExhausted,
    /// Anything else: the store failed, a reused key, an event too large, ...
    Error,
}

impl CommandOutcome {
    /// The outcome of a finished command that was not replayed.
    pub(crate) fn of<T>(result: &Result<T, Error>) -> Self {
        match result {
            Ok(_) => CommandOutcome::Stored,
            Err(err) if err.is_rejection() => CommandOutcome::Rejected,
            Err(err) if err.is_conflict() => CommandOutcome::ConflictExhausted,
            Err(_) => CommandOutcome::Error,
        }
    }

    /// The `outcome` label's value (also the `execute` span's `outcome` field).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Stored => "stored",
            CommandOutcome::Replayed => "replayed",
            CommandOutcome::Rejected => "rejected",
            CommandOutcome::ConflictExhausted => "conflict_exhausted",
            CommandOutcome::Error => "error",
        }
    }
}

/// Records a finished command: its outcome and how long it took, retries included.
pub(crate) fn command_finished(
    aggregate_type: &'static str,
    outcome: CommandOutcome,
    started: Instant,
) {
    metrics::counter!(COMMANDS, "aggregate_type" => aggregate_type, "outcome" => outcome.as_str())
        .increment(1);
    metrics::histogram!(COMMAND_DURATION, "aggregate_type" => aggregate_type)
        .record(started.elapsed().as_secs_f64());
}

/// Records an optimistic-concurrency conflict that the repository retries.
pub(crate) fn command_conflict(aggregate_type: &'static str) {
    metrics::counter!(COMMAND_CONFLICTS, "aggregate_type" => aggregate_type).increment(1);
}

/// Records a command attempt that appended from the aggregate cache.
pub(crate) fn cache_hit(aggregate_type: &'static str) {
    metrics::counter!(CACHE_HITS, "aggregate_type" => aggregate_type).increment(1);
}

/// Records a command attempt that loaded the aggregate from the store.
pub(crate) fn cache_miss(aggregate_type: &'static str) {
    metrics::counter!(CACHE_MISSES, "aggregate_type" => aggregate_type).increment(1);
}

/// Records a projection's checkpoint after a batch; `lag` is the number of events known
/// to wait after it (see the crate docs for what "known" means), and `last_stored` the
/// time the batch's last event was stored, when the batch was full (its age is how far
/// behind the projection runs; a batch that reached the end of the log is 0 s behind).
/// Shared with `thalo_postgres::PgSubscription` through `__private`.
pub fn projection_progress(
    projection: &str,
    position: u64,
    lag: u64,
    last_stored: Option<chrono::DateTime<chrono::Utc>>,
) {
    // One label allocation per batch, not per event.
    let projection = projection.to_owned();
    metrics::gauge!(PROJECTION_POSITION, "projection" => projection.clone()).set(position as f64);
    metrics::gauge!(PROJECTION_LAG, "projection" => projection.clone()).set(lag as f64);
    let behind = last_stored.map_or(0.0, |stored| {
        (chrono::Utc::now() - stored)
            .to_std()
            .map_or(0.0, |age| age.as_secs_f64())
    });
    metrics::gauge!(PROJECTION_LAG_SECONDS, "projection" => projection).set(behind);
}
