-- Process managers (sagas): the state of each instance, and durable timers. A process
-- manager's runner saves an event's new states and timer changes in one transaction with
-- its checkpoint (a row of `checkpoints` named after the process manager), after the
-- event's commands were executed under keys derived from the event, so a crash at any
-- point replays the event with the same keys and nothing is applied twice. The inputs of
-- an instance are replayed in their original order: see `process_states.pending`.
CREATE TABLE process_states (
    process_manager TEXT NOT NULL,
    -- The instance, as `ProcessManager::correlate` names it.
    instance        TEXT NOT NULL,
    state           JSONB NOT NULL,
    -- A completed instance ignores later events and has no timers.
    completed       BOOLEAN NOT NULL DEFAULT false,
    -- The inputs (`{"kind":"event","position":N}`, `{"kind":"timer","id":..,"name":..}`)
    -- handled since `state` was saved whose commands may have run, in order: written in
    -- its own transaction before the commands, cleared with the state's save. After a
    -- crash the runner replays them first, so an instance's inputs are replayed in their
    -- original order and a timer's commands never meet a state that misses them.
    pending         JSONB,
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
