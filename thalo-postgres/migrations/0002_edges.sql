-- The edges of the pipeline: relay leadership, parked aggregates (outbox and
-- consumers), and the record of every operator decision about them.

-- The relay leader's fencing token. Taking the outbox lock increments `epoch`; every
-- message a leader publishes carries it, so consumers can drop a deposed leader's late
-- messages. One row.
CREATE TABLE outbox_leader (
    id          SMALLINT PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    epoch       BIGINT NOT NULL,
    holder      TEXT NOT NULL,
    since       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Aggregates whose outbox rows the relay holds back: an event of theirs was refused
-- for good by the broker (too large, invalid topic, not authorised, ...). Their rows
-- stay in the outbox, in order, until an operator retries or skips.
CREATE TABLE outbox_parked (
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    outbox_id       BIGINT NOT NULL,
    position        BIGINT NOT NULL,
    sequence        BIGINT NOT NULL,
    error           TEXT NOT NULL,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Streams a consumer (an event handler or projection, by name) stopped applying:
-- `sequence` is the first event it did not apply. Its later events are held behind it
-- (sequenced dead letters) until a re-drive applies them in order.
CREATE TABLE consumer_parked (
    consumer        TEXT NOT NULL,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    sequence        BIGINT NOT NULL,
    error           TEXT NOT NULL,
    held            BIGINT NOT NULL DEFAULT 0,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
);

-- What happened to parked aggregates and streams: parked, retried, re-driven, skipped.
-- `consumer` is NULL for the relay.
CREATE TABLE parking_log (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer        TEXT,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    action          TEXT NOT NULL,
    sequence        BIGINT,
    position        BIGINT,
    detail          TEXT NOT NULL DEFAULT '',
    at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX parking_log_stream ON parking_log (aggregate_type, aggregate_id, id);

-- A projection's stream is parked: its later events are held, not applied, until a
-- re-drive. Kept on the checkpoint row so that the lock an applier takes on that row
-- also tells it, with no extra round trip, whether the stream is parked.
ALTER TABLE stream_checkpoints ADD COLUMN parked BOOLEAN NOT NULL DEFAULT false;
