//! Every SQL statement of the tool that the libraries do not offer as an API.
//!
//! As in `thalo-postgres`, statements are built once from the validated
//! [`SchemaName`], the only part spliced into SQL text; values are bound parameters.

use thalo_postgres::SchemaName;

/// The statements of one schema.
#[derive(Debug)]
pub(crate) struct Sql {
    /// Whether a table exists: `$1` its schema-qualified name.
    pub table_exists: &'static str,
    /// The highest global position (0 for an empty store).
    pub head: String,
    /// Store-fed readers (a row in `checkpoints`): name, position, updated_at, events
    /// after the checkpoint in global order, age of the oldest of them (seconds).
    pub store_fed: String,
    /// Kafka-fed projections and handlers (rows in `stream_checkpoints` only): name,
    /// streams, events behind, age of the oldest unapplied event (seconds).
    pub kafka_fed: String,
    /// Parked streams per consumer.
    pub parked_per_consumer: String,
    /// Aggregate types in the store.
    pub aggregate_types: String,
    /// Projection reset, step 1: `$1` name; deletes its `checkpoints` row.
    pub reset_checkpoint: String,
    /// Projection reset, step 2: deletes its parked streams and records each in
    /// `parking_log` (action `reset`), so no parked stream disappears silently.
    pub reset_parked: String,
    /// Projection reset, step 3: deletes its `stream_checkpoints` rows.
    pub reset_stream_checkpoints: String,
    /// Events to republish: `$1` first position, `$2` last, `$3` aggregate type or NULL.
    /// Count, first and last position.
    pub republish_count: String,
    /// One republish batch: outbox rows for the events after position `$1` up to `$2`
    /// (`$3` aggregate type or NULL), at most `$4`, in position order. Returns how many
    /// rows it inserted and the last position.
    ///
    /// Position order is sequence order within each aggregate (the append of sequence
    /// n+1 starts after the append of n committed, so it takes a higher position), and
    /// the outbox ids are handed out in that order (`INSERT ... SELECT ... ORDER BY`, as
    /// the store's own append does), so the relay publishes each aggregate's events in
    /// order.
    pub republish_batch: String,
    /// Wakes the relay: `$1` the store's notification channel.
    pub wake: &'static str,
    /// The applied migrations, from sqlx's table in the store's schema.
    pub migrations: String,
}

impl Sql {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let events = schema.qualify("events");
        let outbox = schema.qualify("outbox");
        let checkpoints = schema.qualify("checkpoints");
        let stream_checkpoints = schema.qualify("stream_checkpoints");
        let consumer_parked = schema.qualify("consumer_parked");
        let parking_log = schema.qualify("parking_log");
        let migrations = schema.qualify("_sqlx_migrations");
        Sql {
            table_exists: "SELECT to_regclass($1) IS NOT NULL",
            head: format!("SELECT COALESCE(max(position), 0) FROM {events}"),
            // The reader's cursor is the event at its position, or the last one before
            // it, and it reads on in `(transaction_id, position)` order (see
            // `thalo-postgres/src/global.rs`): exactly these are the events it has not
            // read yet. Counted, not subtracted: positions have gaps.
            store_fed: format!(
                "SELECT c.name, c.position, c.updated_at, lag.behind, lag.oldest \
                 FROM {checkpoints} c \
                 CROSS JOIN LATERAL ( \
                     SELECT count(*) AS behind, \
                            EXTRACT(EPOCH FROM (now() - min(e.created_at)))::float8 AS oldest \
                     FROM {events} e \
                     WHERE (e.transaction_id, e.position) > ( \
                         COALESCE((SELECT x.transaction_id FROM {events} x \
                                   WHERE x.position <= c.position \
                                   ORDER BY x.position DESC LIMIT 1), '0'::xid8), \
                         c.position)) lag \
                 ORDER BY c.name"
            ),
            // Per stream the projection has seen: the store's last sequence minus the
            // checkpointed one, and the stored time of the first unapplied event (the
            // oldest of its stream). Index lookups on `events_stream_sequence` only.
            kafka_fed: format!(
                "SELECT s.projection, count(*) AS streams, \
                        COALESCE(sum(GREATEST(h.last - s.sequence, 0)), 0)::int8 AS behind, \
                        EXTRACT(EPOCH FROM (now() - min(n.created_at)))::float8 AS oldest \
                 FROM {stream_checkpoints} s \
                 CROSS JOIN LATERAL ( \
                     SELECT COALESCE(max(e.sequence), 0) AS last FROM {events} e \
                     WHERE e.aggregate_type = s.aggregate_type \
                       AND e.aggregate_id = s.aggregate_id) h \
                 LEFT JOIN {events} n ON n.aggregate_type = s.aggregate_type \
                     AND n.aggregate_id = s.aggregate_id AND n.sequence = s.sequence + 1 \
                 WHERE NOT EXISTS (SELECT 1 FROM {checkpoints} c WHERE c.name = s.projection) \
                 GROUP BY s.projection ORDER BY s.projection"
            ),
            parked_per_consumer: format!(
                "SELECT consumer, count(*) FROM {consumer_parked} GROUP BY consumer"
            ),
            // A loose index scan on `events_stream_sequence`: one index probe per
            // aggregate type, instead of a scan of every event.
            aggregate_types: format!(
                "WITH RECURSIVE t AS ( \
                     (SELECT aggregate_type FROM {events} ORDER BY aggregate_type LIMIT 1) \
                     UNION ALL \
                     SELECT (SELECT e.aggregate_type FROM {events} e \
                             WHERE e.aggregate_type > t.aggregate_type \
                             ORDER BY e.aggregate_type LIMIT 1) \
                     FROM t WHERE t.aggregate_type IS NOT NULL) \
                 SELECT aggregate_type FROM t WHERE aggregate_type IS NOT NULL"
            ),
            reset_checkpoint: format!("DELETE FROM {checkpoints} WHERE name = $1"),
            reset_parked: format!(
                "WITH gone AS ( \
                     DELETE FROM {consumer_parked} WHERE consumer = $1 \
                     RETURNING consumer, aggregate_type, aggregate_id, sequence) \
                 INSERT INTO {parking_log} (consumer, aggregate_type, aggregate_id, action, sequence, detail) \
                 SELECT consumer, aggregate_type, aggregate_id, 'reset', sequence, \
                        'projection reset by an operator (thalo projection reset)' FROM gone"
            ),
            reset_stream_checkpoints: format!(
                "DELETE FROM {stream_checkpoints} WHERE projection = $1"
            ),
            republish_count: format!(
                "SELECT count(*), min(position), max(position) FROM {events} \
                 WHERE position BETWEEN $1 AND $2 AND ($3::text IS NULL OR aggregate_type = $3)"
            ),
            republish_batch: format!(
                "WITH batch AS ( \
                     SELECT position FROM {events} \
                     WHERE position > $1 AND position <= $2 \
                       AND ($3::text IS NULL OR aggregate_type = $3) \
                     ORDER BY position LIMIT $4), \
                 inserted AS ( \
                     INSERT INTO {outbox} (position) SELECT position FROM batch ORDER BY position \
                     RETURNING position) \
                 SELECT count(*), max(position) FROM inserted"
            ),
            wake: "SELECT pg_notify($1, '')",
            migrations: format!(
                "SELECT version, description, installed_on, success FROM {migrations} ORDER BY version"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_is_schema_qualified() {
        let schema = SchemaName::new("ops_test").expect("valid");
        let sql = Sql::new(&schema);
        for statement in [
            &sql.head,
            &sql.store_fed,
            &sql.kafka_fed,
            &sql.parked_per_consumer,
            &sql.reset_checkpoint,
            &sql.reset_parked,
            &sql.reset_stream_checkpoints,
            &sql.republish_count,
            &sql.republish_batch,
            &sql.migrations,
        ] {
            assert!(statement.contains("\"ops_test\"."), "{statement}");
            for table in ["events", "outbox", "checkpoints", "consumer_parked"] {
                assert!(
                    !statement.contains(&format!("FROM {table} ")),
                    "unqualified `{table}` in {statement}"
                );
            }
        }
    }
}
