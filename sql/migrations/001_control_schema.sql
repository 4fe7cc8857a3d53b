-- The control schema: the registry of declared tables and the failure ledger.
-- Run once, in order, by `vectorsync install`; the version is recorded in vectorsync.migrations.

CREATE TABLE vectorsync.embedding_tables (
    name            text PRIMARY KEY,
    source_schema   text NOT NULL,
    source_table    text NOT NULL,
    store_schema    text NOT NULL,
    store_table     text NOT NULL,
    queue_table     text NOT NULL,
    key_columns     text[] NOT NULL,
    buckets         int NOT NULL CHECK (buckets > 0),
    fingerprint     text NOT NULL,
    spec            jsonb NOT NULL,
    installed_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per failing source row. A row that later succeeds leaves the ledger.
-- Rows skipped on purpose (no content) are recorded here too, with kind 'skipped' and no retry.
CREATE TABLE vectorsync.failures (
    table_name      text NOT NULL REFERENCES vectorsync.embedding_tables (name) ON DELETE CASCADE,
    row_key         jsonb NOT NULL,
    bucket          int NOT NULL,
    error_kind      text NOT NULL,
    last_error      text NOT NULL,
    attempts        int NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz,
    dead            boolean NOT NULL DEFAULT false,
    PRIMARY KEY (table_name, row_key)
);
CREATE INDEX failures_due_idx ON vectorsync.failures (table_name, next_attempt_at) WHERE NOT dead;
