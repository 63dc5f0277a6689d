-- Process managers (sagas): the state of each instance, and durable timers. A process
-- manager's runner saves an event's new states and timer changes in one transaction with
-- its checkpoint (a row of `checkpoints` named after the process manager), after the
-- event's commands were executed under keys derived from the event, so a crash at any
-- point replays the event with the same keys and nothing is applied twice.
CREATE TABLE process_states (
    process_manager TEXT NOT NULL,
    -- The instance, as `ProcessManager::correlate` names it.
    instance        TEXT NOT NULL,
    state           JSONB NOT NULL,
    -- A completed instance ignores later events and has no timers.
    completed       BOOLEAN NOT NULL DEFAULT false,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (process_manager, instance)
);

-- Pending timers: a row until the timer fires (deleted in the transaction that saves
-- what firing did) or is cancelled. Setting a timer of the same name again replaces the
-- row, with a new id: the id keys the commands the firing issues.
CREATE TABLE process_timers (
    id              UUID PRIMARY KEY,
    process_manager TEXT NOT NULL,
    instance        TEXT NOT NULL,
    name            TEXT NOT NULL,
    due_at          TIMESTAMPTZ NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (process_manager, instance, name)
);

CREATE INDEX process_timers_due ON process_timers (process_manager, due_at);
