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
