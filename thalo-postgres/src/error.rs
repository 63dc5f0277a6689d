//! From sqlx errors to [`thalo::Error`]: domain meaning first.

use std::borrow::Cow;

use thalo::Error;

/// The unique constraint that guards stream sequences (see `migrations/0001_init.sql`).
pub(crate) const STREAM_SEQUENCE_CONSTRAINT: &str = "events_stream_sequence";

/// Wraps a driver error as a store error with `context`.
pub(crate) fn store(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |err| Error::store(context, err)
}

/// Maps an append's driver error: a unique violation on the stream sequence means another
/// writer appended first, which is a concurrency conflict and never a generic store error.
pub(crate) fn append(
    err: sqlx::Error,
    aggregate_type: &'static str,
    aggregate_id: &str,
    expected: u64,
) -> Error {
    if is_stream_conflict(&err) {
        return Error::Conflict {
            aggregate_type: Cow::Borrowed(aggregate_type),
            aggregate_id: aggregate_id.to_owned(),
            expected,
            // The winner's version is not known without another query.
            actual: None,
            source: Some(Box::new(err)),
        };
    }
    Error::store("appending events", err)
}

/// Whether `err` is the unique violation of [`STREAM_SEQUENCE_CONSTRAINT`].
pub(crate) fn is_stream_conflict(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() && db.constraint() == Some(STREAM_SEQUENCE_CONSTRAINT)
        }
        _ => false,
    }
}

/// Converts a stored `BIGINT` that must not be negative.
pub(crate) fn to_u64(value: i64, what: &'static str) -> Result<u64, Error> {
    u64::try_from(value)
        .map_err(|e| Error::store(format!("negative {what} ({value}) in the store"), e))
}

/// Converts a number to a `BIGINT` parameter.
pub(crate) fn to_i64(value: u64, what: &'static str) -> Result<i64, Error> {
    i64::try_from(value)
        .map_err(|_| Error::config(format!("{what} {value} does not fit a Postgres BIGINT")))
}

/// Whether `err` is a database outage that retrying gets past, judged by the first
/// `sqlx::Error` in its chain (so a projection's own query error, wrapped in
/// [`Error::Handler`] or [`Error::Store`], counts too): a lost connection, TLS or
/// protocol failure, a pool timeout, a server shutting down or out of resources
/// (SQLSTATE classes 08, 53, 57P), a serialization failure or deadlock (40001,
/// 40P01). `None` when the chain holds no `sqlx::Error`; `Some(false)` for other SQL
/// errors (a constraint violation, a missing table): retrying the same work fails again.
///
/// [`PgSubscription::run`](crate::PgSubscription::run) retries outages; the Kafka
/// consumer of `thalo-kafka` retries them without counting attempts.
///
/// ```
/// use thalo::Error;
/// use thalo_postgres::database_outage;
///
/// let lost = Error::handler("balances", Error::store("updating", sqlx::Error::PoolTimedOut));
/// assert_eq!(database_outage(&lost), Some(true));
/// let bad = Error::store("updating", sqlx::Error::RowNotFound);
/// assert_eq!(database_outage(&bad), Some(false));
/// assert_eq!(database_outage(&Error::config("x")), None);
/// ```
pub fn database_outage(err: &Error) -> Option<bool> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(sqlx_err) = e.downcast_ref::<sqlx::Error>() {
            return Some(is_transient(sqlx_err));
        }
        cause = e.source();
    }
    None
}

fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P: operator
            // intervention (shutdown, crash); 40001/40P01: serialization failure and
            // deadlock, which succeed when retried.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}
