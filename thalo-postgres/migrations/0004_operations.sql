-- Versions of projections, for rebuilds without downtime (blue/green). A projection
-- whose read model changes gets a new version: it is built from the start of the store
-- into tables of its own while the live version keeps serving reads and applying new
-- events, and becomes live once it has caught up. At most one version of a projection
-- is live; readers query a view that points at the live version's tables.
CREATE TABLE projection_versions (
    projection      TEXT NOT NULL,
    version         INTEGER NOT NULL CHECK (version >= 1),
    -- 'building', 'live' or 'retired'.
    state           TEXT NOT NULL CHECK (state IN ('building', 'live', 'retired')),
    -- The read model's tables (qualified), and the views readers use, in pairs.
    tables          TEXT[] NOT NULL DEFAULT '{}',
    views           TEXT[] NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    live_at         TIMESTAMPTZ,
    retired_at      TIMESTAMPTZ,
    PRIMARY KEY (projection, version)
);

CREATE UNIQUE INDEX projection_versions_one_live
    ON projection_versions (projection) WHERE state = 'live';

-- An operator's request to re-drive a parked stream (`thalo dlq redrive`): the running
-- consumer that parked it picks the request up and re-drives the stream with its own
-- code, from the store, in order, exactly once. Cleared by the re-drive (the row goes)
-- or by a failed attempt (recorded in `parking_log`).
ALTER TABLE consumer_parked ADD COLUMN redrive_requested_at TIMESTAMPTZ;
