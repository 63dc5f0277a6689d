//! Decoding rows into envelopes, straight from the row's buffers (no intermediate
//! `serde_json::Value`).

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use thalo::{Error, Event, EventEnvelope, Metadata, RawEvent};
use uuid::Uuid;

use crate::error::{store, to_u64};

/// Column indices of `sql::ENVELOPE_COLUMNS`.
pub(crate) mod col {
    pub const POSITION: usize = 0;
    pub const EVENT_ID: usize = 1;
    pub const AGGREGATE_TYPE: usize = 2;
    pub const AGGREGATE_ID: usize = 3;
    pub const SEQUENCE: usize = 4;
    pub const EVENT_TYPE: usize = 5;
    pub const EVENT_VERSION: usize = 6;
    pub const PAYLOAD: usize = 7;
    pub const METADATA: usize = 8;
    pub const CREATED_AT: usize = 9;
    /// Only in `read_all`.
    pub const SETTLED: usize = 10;
}

/// Column indices of the `load` statements.
mod load_col {
    pub const SEQUENCE: usize = 0;
    /// NULL on the snapshot row.
    pub const EVENT_TYPE: usize = 1;
    pub const EVENT_VERSION: usize = 2;
    pub const PAYLOAD: usize = 3;
}

/// A row of the `load` statements: an event, or (with `event_type` `None`) the snapshot.
pub(crate) struct LoadRow<'r> {
    /// The event's sequence, or the snapshot's version.
    pub sequence: u64,
    pub event_type: Option<&'r str>,
    pub event_version: u16,
    pub payload: &'r str,
}

fn load_error(err: sqlx::Error) -> Error {
    Error::store("decoding an event row", err)
}

/// Decodes a `load` row. This is the per-event hot path of every command, so it skips
/// sqlx's per-column type-compatibility check (`try_get_unchecked`): the statements in
/// `sql.rs` fix the column types (`BIGINT`, `TEXT`, `SMALLINT`, `TEXT`), and decoding
/// still validates the bytes.
pub(crate) fn load_row(row: &PgRow) -> Result<LoadRow<'_>, Error> {
    let sequence: i64 = row
        .try_get_unchecked(load_col::SEQUENCE)
        .map_err(load_error)?;
    let event_type: Option<&str> = row
        .try_get_unchecked(load_col::EVENT_TYPE)
        .map_err(load_error)?;
    let event_version = match event_type {
        Some(_) => {
            let version: i16 = row
                .try_get_unchecked(load_col::EVENT_VERSION)
                .map_err(load_error)?;
            u16::try_from(version)
                .map_err(|e| Error::store(format!("negative event version {version}"), e))?
        }
        None => 0,
    };
    let payload: &str = row
        .try_get_unchecked(load_col::PAYLOAD)
        .map_err(load_error)?;
    Ok(LoadRow {
        sequence: to_u64(sequence, "sequence")?,
        event_type,
        event_version,
        payload,
    })
}

fn get<'r, T>(row: &'r PgRow, index: usize) -> Result<T, Error>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(store("decoding a row"))
}

/// The event version column (`SMALLINT`) as the `u16` of [`Event::event_version`].
pub(crate) fn event_version(row: &PgRow, index: usize) -> Result<u16, Error> {
    let version: i16 = get(row, index)?;
    u16::try_from(version).map_err(|e| Error::store(format!("negative event version {version}"), e))
}

pub(crate) fn sequence(row: &PgRow, index: usize) -> Result<u64, Error> {
    to_u64(get(row, index)?, "sequence")
}

pub(crate) fn settled(row: &PgRow) -> Result<bool, Error> {
    get(row, col::SETTLED)
}

fn metadata(row: &PgRow) -> Result<Metadata, Error> {
    let text: &str = get(row, col::METADATA)?;
    if text == "{}" {
        return Ok(Metadata::default());
    }
    serde_json::from_str(text).map_err(|e| Error::serialization("event metadata", e))
}

/// Decodes an envelope row, with `event` making the event from aggregate type, event
/// type, version and payload.
fn envelope<E>(
    row: &PgRow,
    event: impl FnOnce(&str, &str, u16, &str) -> Result<E, Error>,
) -> Result<EventEnvelope<E>, Error> {
    let id: Uuid = get(row, col::EVENT_ID)?;
    let timestamp: DateTime<Utc> = get(row, col::CREATED_AT)?;
    let event = event(
        get(row, col::AGGREGATE_TYPE)?,
        get(row, col::EVENT_TYPE)?,
        event_version(row, col::EVENT_VERSION)?,
        get(row, col::PAYLOAD)?,
    )?;
    Ok(EventEnvelope {
        id,
        aggregate_type: get::<&str>(row, col::AGGREGATE_TYPE)?.to_owned(),
        aggregate_id: get::<&str>(row, col::AGGREGATE_ID)?.to_owned(),
        sequence: sequence(row, col::SEQUENCE)?,
        position: to_u64(get(row, col::POSITION)?, "position")?,
        timestamp,
        metadata: metadata(row)?,
        event,
    })
}

/// An envelope with the event decoded into `E`.
pub(crate) fn decoded<E: Event>(row: &PgRow) -> Result<EventEnvelope<E>, Error> {
    envelope(row, E::decode_from)
}

/// An envelope with the event kept encoded.
pub(crate) fn raw(row: &PgRow) -> Result<EventEnvelope<RawEvent>, Error> {
    envelope(row, |_, event_type, version, payload| {
        Ok(RawEvent {
            event_type: event_type.to_owned(),
            version,
            payload: payload.to_owned(),
        })
    })
}
