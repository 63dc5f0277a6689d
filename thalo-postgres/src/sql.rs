//! Every SQL statement of the crate.
//!
//! Statements are built once per store from its validated [`SchemaName`], the only
//! non-constant part that is ever spliced into SQL text; values are always bound
//! parameters. Keeping the strings stable per store also lets sqlx reuse its cached
//! prepared statement on every connection.

use crate::SchemaName;

/// `SELECT pg_advisory_lock(key)`, with the key derived from a text `$1`.
pub(crate) const ADVISORY_LOCK: &str = "SELECT pg_advisory_lock(hashtextextended($1, 0))";

/// Releases [`ADVISORY_LOCK`].
pub(crate) const ADVISORY_UNLOCK: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";

/// A transaction-scoped advisory lock (released at commit or rollback).
pub(crate) const ADVISORY_XACT_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

/// A notification sent on its own, after an append committed ([`NotifyMode::AfterCommit`]).
/// A notifying transaction takes a transaction id, so its commit would wait for a WAL
/// flush; a wake-up needs no durability, so it commits asynchronously (`SET LOCAL
/// synchronous_commit = off` for this transaction only).
///
/// [`NotifyMode::AfterCommit`]: crate::NotifyMode::AfterCommit
pub(crate) const NOTIFY: &str =
    "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)";

/// The key of the per-schema migration lock.
pub(crate) fn migrate_lock_key(schema: &SchemaName) -> String {
    format!("thalo:migrate:{schema}")
}

/// The key of the lock that serialises runners of one subscription.
pub(crate) fn subscription_lock_key(schema: &SchemaName, name: &str) -> String {
    format!("thalo:subscription:{schema}:{name}")
}

pub(crate) fn create_schema(schema: &SchemaName) -> String {
    format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted())
}

pub(crate) fn set_search_path(schema: &SchemaName) -> String {
    format!("SET search_path TO {}", schema.quoted())
}

/// Column list shared by the statements that return whole envelopes; decoded by
/// `row::envelope` (keep the order in sync with `row::col`).
const ENVELOPE_COLUMNS: &str = "position, event_id, aggregate_type, aggregate_id, sequence, \
     event_type, event_version, payload::text, metadata::text, created_at";

/// The statements of one store.
#[derive(Debug)]
pub(crate) struct Sql {
    /// Append: `$1` aggregate type, `$2` aggregate id, `$3` expected version, `$4` event
    /// ids, `$5` event types, `$6` event versions, `$7` payloads (text), `$8` metadata
    /// (text), `$9` timestamp. No notification: see [`Sql::append_notify`].
    ///
    /// One statement (so one round trip, atomic even without an explicit transaction):
    /// `head` reads the stream's version through the unique index; the events are
    /// inserted only when it equals the expected version (so appending past the end is a
    /// conflict too), numbered expected+1.. in order; the outbox gets one row per event in
    /// position order; the notification carries the last position and is delivered at
    /// commit. A concurrent append with the same expected version passes the `head`
    /// check as well, and then loses on the `events_stream_sequence` unique constraint.
    /// Returns the version seen by `head` and the new positions by sequence (NULL when
    /// nothing was inserted).
    pub append: String,
    /// [`Sql::append`] that also notifies channel `$10` with the last position, in the
    /// append's transaction.
    pub append_notify: String,
    /// [`Sql::append`] that records a command key: `$10` command id, `$11` fingerprint,
    /// `$12` retention (seconds, float). The key row is inserted only when the head
    /// matches, and the events only when the key row was inserted (it was not recorded,
    /// or its record had expired and is overwritten), so events and key commit together
    /// or not at all, and of two appends racing on one key the second waits for the
    /// first and inserts nothing. Returns [`Sql::append`]'s columns, then `recorded`:
    /// whether the key was recorded by this statement.
    pub append_once: String,
    /// [`Sql::append_once`] that also notifies channel `$13`.
    pub append_once_notify: String,
    /// The unexpired record of command `$1` (retention `$2` seconds).
    pub find_command: String,
    /// Records a command that stored nothing, unless its key is recorded (and
    /// unexpired): `$1` command id, `$2` aggregate type, `$3` aggregate id, `$4`
    /// fingerprint, `$5` the aggregate's version, `$6` rejected, `$7` code, `$8`
    /// message, `$9` retention (seconds). Returns a row when it recorded.
    pub record_command: String,
    /// Whole envelopes of a stream with sequences `$3..=$4`.
    pub read_range: String,
    /// Deletes command records older than `$1` seconds.
    pub prune_commands: String,
    /// Group commit: [`Sql::append`] for many streams at once, one request per stream.
    /// Requests: `$1` request index, `$2` aggregate type, `$3` aggregate id, `$4` expected
    /// version, `$5` metadata (text), `$6` timestamp. Events: `$7` request index, `$8`
    /// ordinal within the request (from 1), `$9` event id, `$10` type, `$11` version,
    /// `$12` payload (text).
    ///
    /// Each request's head is read as in [`Sql::append`]; only the events of requests
    /// whose head equals their expected version are inserted (with their outbox rows), so
    /// a stale request inserts nothing and does not affect the others. Returns one row
    /// per request, in request order: its index, the head seen, and the new positions by
    /// sequence (NULL when nothing was inserted for it). Inserted rows are matched back to
    /// their request by stream, which is unique within a batch. A writer outside the
    /// batch racing one of its streams makes the whole statement fail on the
    /// `events_stream_sequence` unique constraint.
    pub append_group: String,
    /// [`Sql::append_group`] that also notifies channel `$13` once with the batch's last
    /// position, in its transaction.
    pub append_group_notify: String,
    /// Events of a stream after `$3`, just what replay needs.
    pub load: String,
    /// [`Sql::load`] preceded by the stream's snapshot, if any, as one ordered result:
    /// the snapshot row (sequence = its version, event type NULL), then the events after
    /// it (whose sequences are all greater).
    pub load_with_snapshot: String,
    /// Upserts a snapshot unless a newer one is stored.
    pub save_snapshot: String,
    /// Whole envelopes of a stream after sequence `$3`.
    pub read_stream: String,
    /// The global log after position `$1`, up to `$2` rows; see `global.rs`.
    pub read_all: String,
    /// The first event after position `$1` in global order, as whether it is below the
    /// read horizon (no row: nothing to read).
    pub peek_after: String,
    pub load_checkpoint: String,
    pub save_checkpoint: String,
    /// Creates missing stream checkpoints (at 0) and locks all of them for the
    /// transaction, returning the stored sequences.
    pub lock_stream_checkpoints: String,
    pub save_stream_checkpoints: String,
}

impl Sql {
    /// The statements of a store in `schema`; without `outbox`, appends write no outbox
    /// rows (a store with no relay).
    pub(crate) fn new(schema: &SchemaName, outbox: bool) -> Self {
        let events = schema.qualify("events");
        let outboxed = if outbox {
            format!(
                ",
outboxed AS (
    INSERT INTO {} (position) SELECT position FROM inserted ORDER BY position
)",
                schema.qualify("outbox")
            )
        } else {
            String::new()
        };
        let snapshots = schema.qualify("snapshots");
        let checkpoints = schema.qualify("checkpoints");
        let commands = schema.qualify("commands");
        let stream_checkpoints = schema.qualify("stream_checkpoints");

        let append_with = |recorded_cte: &str, gate: &str, extra_columns: &str| {
            format!(
                "WITH head AS (
    SELECT COALESCE(max(sequence), 0) AS version
    FROM {events} WHERE aggregate_type = $1 AND aggregate_id = $2
),{recorded_cte}
inserted AS (
    INSERT INTO {events} (event_id, aggregate_type, aggregate_id, sequence, event_type,
                          event_version, payload, metadata, created_at)
    SELECT e.event_id, $1, $2, $3 + e.ord, e.event_type, e.event_version,
           e.payload::jsonb, $8::jsonb, $9
    FROM UNNEST($4::uuid[], $5::text[], $6::int2[], $7::text[])
         WITH ORDINALITY AS e(event_id, event_type, event_version, payload, ord)
    WHERE (SELECT version FROM head) = $3{gate}
    ORDER BY e.ord
    RETURNING sequence, position
){outboxed}
SELECT (SELECT version FROM head) AS version,
       (SELECT array_agg(position ORDER BY sequence) FROM inserted) AS positions{extra_columns}"
            )
        };
        // `pg_notify` returns void; the cast gives the column a type every client decodes.
        let notify_on = |channel: &str| {
            format!(
                ",\n       (SELECT pg_notify({channel}, max(position)::text) FROM inserted \
                 HAVING count(*) > 0)::text AS notified"
            )
        };
        let append = append_with("", "", "");
        let append_notify = append_with("", "", &notify_on("$10"));
        let recorded_cte = format!(
            "
recorded AS (
    INSERT INTO {commands} AS c (command_id, aggregate_type, aggregate_id, fingerprint,
                                 first_sequence, last_sequence, recorded_at)
    SELECT $10, $1, $2, $11, $3 + 1, $3 + cardinality($4::uuid[]), now()
    WHERE (SELECT version FROM head) = $3
    ON CONFLICT (command_id) DO UPDATE
    SET aggregate_type = EXCLUDED.aggregate_type, aggregate_id = EXCLUDED.aggregate_id,
        fingerprint = EXCLUDED.fingerprint, first_sequence = EXCLUDED.first_sequence,
        last_sequence = EXCLUDED.last_sequence, rejected = false, rejection_code = NULL,
        rejection_message = NULL, recorded_at = EXCLUDED.recorded_at
    WHERE c.recorded_at < now() - make_interval(secs => $12)
    RETURNING 1
),"
        );
        let gate = " AND EXISTS (SELECT 1 FROM recorded)";
        let recorded_column = ",\n       EXISTS (SELECT 1 FROM recorded) AS recorded";
        let append_once = append_with(&recorded_cte, gate, recorded_column);
        let append_once_notify = append_with(
            &recorded_cte,
            gate,
            &format!("{recorded_column}{}", notify_on("$13")),
        );
        let find_command = format!(
            "SELECT aggregate_type, aggregate_id, fingerprint, first_sequence, last_sequence,
       rejected, rejection_code, rejection_message
FROM {commands}
WHERE command_id = $1 AND recorded_at >= now() - make_interval(secs => $2)"
        );
        let record_command = format!(
            "INSERT INTO {commands} AS c (command_id, aggregate_type, aggregate_id, fingerprint,
                             first_sequence, last_sequence, rejected, rejection_code,
                             rejection_message, recorded_at)
VALUES ($1, $2, $3, $4, $5 + 1, $5, $6, $7, $8, now())
ON CONFLICT (command_id) DO UPDATE
SET aggregate_type = EXCLUDED.aggregate_type, aggregate_id = EXCLUDED.aggregate_id,
    fingerprint = EXCLUDED.fingerprint, first_sequence = EXCLUDED.first_sequence,
    last_sequence = EXCLUDED.last_sequence, rejected = EXCLUDED.rejected,
    rejection_code = EXCLUDED.rejection_code, rejection_message = EXCLUDED.rejection_message,
    recorded_at = EXCLUDED.recorded_at
WHERE c.recorded_at < now() - make_interval(secs => $9)
RETURNING 1"
        );
        let read_range = format!(
            "SELECT {ENVELOPE_COLUMNS}
FROM {events}
WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence BETWEEN $3 AND $4
ORDER BY sequence"
        );
        let prune_commands =
            format!("DELETE FROM {commands} WHERE recorded_at < now() - make_interval(secs => $1)");

        let append_group_with = |notify_column: &str| {
            format!(
                "WITH req AS (
    SELECT r.req, r.aggregate_type, r.aggregate_id, r.expected, r.metadata, r.created_at,
           COALESCE((SELECT max(h.sequence) FROM {events} h
                     WHERE h.aggregate_type = r.aggregate_type
                       AND h.aggregate_id = r.aggregate_id), 0) AS version
    FROM UNNEST($1::int4[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::timestamptz[])
         AS r(req, aggregate_type, aggregate_id, expected, metadata, created_at)
),
inserted AS (
    INSERT INTO {events} (event_id, aggregate_type, aggregate_id, sequence, event_type,
                          event_version, payload, metadata, created_at)
    SELECT e.event_id, r.aggregate_type, r.aggregate_id, r.expected + e.ord, e.event_type,
           e.event_version, e.payload::jsonb, r.metadata::jsonb, r.created_at
    FROM UNNEST($7::int4[], $8::int8[], $9::uuid[], $10::text[], $11::int2[], $12::text[])
         AS e(req, ord, event_id, event_type, event_version, payload)
    JOIN req r ON r.req = e.req
    WHERE r.version = r.expected
    ORDER BY e.req, e.ord
    RETURNING aggregate_type, aggregate_id, sequence, position
){outboxed}
SELECT r.req, r.version, p.positions{notify_column}
FROM req r
LEFT JOIN (SELECT aggregate_type, aggregate_id,
                  array_agg(position ORDER BY sequence) AS positions
           FROM inserted GROUP BY aggregate_type, aggregate_id) p
       ON p.aggregate_type = r.aggregate_type AND p.aggregate_id = r.aggregate_id
ORDER BY r.req"
            )
        };
        let append_group = append_group_with("");
        let append_group_notify = append_group_with(
            ",\n       (SELECT pg_notify($13, max(position)::text) FROM inserted \
             HAVING count(*) > 0)::text AS notified",
        );

        let load = format!(
            "SELECT sequence, event_type, event_version, payload::text
FROM {events}
WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
ORDER BY sequence"
        );
        let load_with_snapshot = format!(
            "SELECT version AS sequence, NULL::text AS event_type, NULL::int2 AS event_version,
       payload::text
FROM {snapshots}
WHERE aggregate_type = $1 AND aggregate_id = $2
UNION ALL
SELECT sequence, event_type, event_version, payload::text
FROM {events}
WHERE aggregate_type = $1 AND aggregate_id = $2
  AND sequence > COALESCE(
      (SELECT version FROM {snapshots} WHERE aggregate_type = $1 AND aggregate_id = $2), 0)
ORDER BY sequence"
        );
        let save_snapshot = format!(
            "INSERT INTO {snapshots} AS s (aggregate_type, aggregate_id, version, payload, created_at)
VALUES ($1, $2, $3, $4::jsonb, now())
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
SET version = EXCLUDED.version, payload = EXCLUDED.payload, created_at = EXCLUDED.created_at
WHERE s.version <= EXCLUDED.version"
        );

        let read_stream = format!(
            "SELECT {ENVELOPE_COLUMNS}
FROM {events}
WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
ORDER BY sequence"
        );

        // The cursor is the event at `$1`, or, if there is none (position 0, or a
        // position that was never committed), the last event before it. See `global.rs`.
        let cursor = format!(
            "(COALESCE((SELECT transaction_id FROM {events} WHERE position <= $1
           ORDER BY position DESC LIMIT 1), '0'::xid8), $1)"
        );
        let read_all = format!(
            "SELECT {ENVELOPE_COLUMNS},
       transaction_id < horizon.xmin AS settled
FROM {events}, (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) AS horizon
WHERE (transaction_id, position) > {cursor}
ORDER BY transaction_id, position
LIMIT $2"
        );
        let peek_after = format!(
            "SELECT transaction_id < horizon.xmin AS settled
FROM {events}, (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) AS horizon
WHERE (transaction_id, position) > {cursor}
ORDER BY transaction_id, position
LIMIT 1"
        );

        let load_checkpoint = format!("SELECT position FROM {checkpoints} WHERE name = $1");
        let save_checkpoint = format!(
            "INSERT INTO {checkpoints} (name, position, updated_at) VALUES ($1, $2, now())
ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at"
        );

        // Keys arrive sorted and distinct, so concurrent appliers lock rows in the same
        // order (no deadlock) and ON CONFLICT never meets a row twice.
        let lock_stream_checkpoints = format!(
            "INSERT INTO {stream_checkpoints} AS c (projection, aggregate_type, aggregate_id, sequence)
SELECT $1, k.aggregate_type, k.aggregate_id, 0
FROM UNNEST($2::text[], $3::text[]) WITH ORDINALITY AS k(aggregate_type, aggregate_id, ord)
ORDER BY k.ord
ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET sequence = c.sequence
RETURNING aggregate_type, aggregate_id, sequence, parked"
        );
        let save_stream_checkpoints = format!(
            "UPDATE {stream_checkpoints} AS c SET sequence = k.sequence
FROM UNNEST($2::text[], $3::text[], $4::int8[]) AS k(aggregate_type, aggregate_id, sequence)
WHERE c.projection = $1 AND c.aggregate_type = k.aggregate_type
  AND c.aggregate_id = k.aggregate_id"
        );

        Sql {
            append,
            append_notify,
            append_once,
            append_once_notify,
            find_command,
            record_command,
            read_range,
            prune_commands,
            append_group,
            append_group_notify,
            load,
            load_with_snapshot,
            save_snapshot,
            read_stream,
            read_all,
            peek_after,
            load_checkpoint,
            save_checkpoint,
            lock_stream_checkpoints,
            save_stream_checkpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_is_schema_qualified() {
        let schema = SchemaName::new("billing").unwrap();
        let sql = Sql::new(&schema, true);
        for statement in [
            &sql.append,
            &sql.append_notify,
            &sql.append_once,
            &sql.append_once_notify,
            &sql.find_command,
            &sql.append_group,
            &sql.append_group_notify,
            &sql.load,
            &sql.read_all,
            &sql.save_checkpoint,
        ] {
            assert!(statement.contains("\"billing\"."), "{statement}");
            for table in ["events", "outbox", "snapshots", "checkpoints"] {
                assert!(
                    !statement.contains(&format!(" {table} ")),
                    "unqualified `{table}` in {statement}"
                );
            }
        }
        assert!(sql.append_notify.contains("pg_notify($10"));
        assert!(!sql.append.contains("pg_notify"));
        assert!(sql.append_once_notify.contains("pg_notify($13"));
        assert!(sql.append_once.contains("\"billing\".commands"));
        assert!(sql.append.contains("\"billing\".outbox"));
        let without = Sql::new(&schema, false);
        for statement in [&without.append, &without.append_once, &without.append_group] {
            assert!(!statement.contains("outbox"), "{statement}");
        }
        assert!(sql.append_group_notify.contains("pg_notify($13"));
        assert!(!sql.append_group.contains("pg_notify"));
    }
}
