-- Fired timers, a row each: inserted in the transaction that deletes the timer's row from
-- `process_timers` and saves what its firing did, so a timer that fires has exactly one
-- row here. `id` is the timer's id (the one its commands are keyed by): a second firing
-- of one timer would violate the primary key and roll back. Operators and tests count
-- firings here; nothing else reads it. It grows with every fired timer and is not pruned
-- with the instances (nothing prunes `process_states`): delete old rows with
-- `PgProcessManager::prune_timer_firings`, or by `fired_at`.
CREATE TABLE process_timer_firings (
    id              UUID PRIMARY KEY,
    process_manager TEXT NOT NULL,
    instance        TEXT NOT NULL,
    name            TEXT NOT NULL,
    due_at          TIMESTAMPTZ NOT NULL,
    fired_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX process_timer_firings_instance
    ON process_timer_firings (process_manager, instance);
CREATE INDEX process_timer_firings_fired
    ON process_timer_firings (process_manager, fired_at);
