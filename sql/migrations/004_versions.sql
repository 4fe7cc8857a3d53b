-- Model versions side by side (assets/versions.py): a new fingerprint, dimension or vector type
-- fills a new version beside the active one; search answers from the active one only, and
-- promotion switches in one transaction. vectorsync.embedding_tables keeps describing the ACTIVE
-- version (store, change log, fingerprint, spec), so every reader of it answers from that one.
CREATE TABLE vectorsync.versions (
    table_name     text NOT NULL REFERENCES vectorsync.embedding_tables (name) ON DELETE CASCADE,
    version        int NOT NULL CHECK (version >= 1),
    -- active: what search answers from; candidate: filling (or full) and waiting for promotion;
    -- previous: switched away from, kept current until drop_after for a rollback; retired: dropped.
    state          text NOT NULL CHECK (state IN ('active', 'candidate', 'previous', 'retired')),
    fingerprint    text NOT NULL,
    spec           jsonb NOT NULL,      -- the version's declaration (provider, template, chunking, ...)
    store_schema   text NOT NULL,
    store_table    text NOT NULL,
    queue_table    text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    promoted_at    timestamptz,
    retired_at     timestamptz,         -- when it stopped being active (or was superseded, or dropped)
    drop_after     timestamptz,         -- a previous version is dropped after this
    rolled_back_at timestamptz,         -- set on a version that a rollback switched away from:
                                        -- `promote: auto` never promotes it again by itself
    freed_bytes    bigint,              -- what dropping it gave back
    note           text,                -- why it was retired (superseded, expired, replaced)
    PRIMARY KEY (table_name, version)
);
CREATE UNIQUE INDEX versions_one_active ON vectorsync.versions (table_name) WHERE state = 'active';
CREATE UNIQUE INDEX versions_one_candidate ON vectorsync.versions (table_name) WHERE state = 'candidate';

-- Existing installs become version 1, active, with their current store and change log.
ALTER TABLE vectorsync.embedding_tables ADD COLUMN version int NOT NULL DEFAULT 1;
INSERT INTO vectorsync.versions
    (table_name, version, state, fingerprint, spec, store_schema, store_table, queue_table, created_at, promoted_at)
SELECT name, 1, 'active', fingerprint, spec, store_schema, store_table, queue_table, installed_at, installed_at
FROM vectorsync.embedding_tables;

-- Each version has its own failure ledger rows: a candidate's failures never count against, or
-- clear, the active version's.
ALTER TABLE vectorsync.failures ADD COLUMN version int NOT NULL DEFAULT 1;
ALTER TABLE vectorsync.failures DROP CONSTRAINT failures_pkey;
ALTER TABLE vectorsync.failures ADD PRIMARY KEY (table_name, version, row_key);
DROP INDEX vectorsync.failures_due_idx;
CREATE INDEX failures_due_idx ON vectorsync.failures (table_name, version, next_attempt_at) WHERE NOT dead;
