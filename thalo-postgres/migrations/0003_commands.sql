-- Idempotent commands: the key of every command executed with one, written in the
-- same statement as the command's events (`append_once`), so both commit or neither
-- does, or on its own for a command that stored nothing (rejected, or no events). The
-- first record of a key stands. The primary key makes two executions of one key race to one winner. Rows older
-- than the store's retention are ignored (and overwritten by a new execution of their
-- key); `prune_commands` deletes them.
CREATE TABLE commands (
    command_id      TEXT PRIMARY KEY,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    -- The command's fingerprint: a retry has the same one, another command does not.
    fingerprint     BIGINT NOT NULL,
    -- The sequences of the events the command stored (an empty range, last < first,
    -- when it stored none).
    first_sequence  BIGINT NOT NULL,
    last_sequence   BIGINT NOT NULL,
    -- A rejected command: its invariant code (NULL for a domain error) and message.
    rejected        BOOLEAN NOT NULL DEFAULT false,
    rejection_code  TEXT,
    rejection_message TEXT,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX commands_recorded_at ON commands (recorded_at);
