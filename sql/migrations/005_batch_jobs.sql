-- Backfills through the provider's batch API (assets/batch_fill.py, assets/batch_api.py).
-- A job is one batch at the provider; it is recorded before anything is sent, and each id the
-- provider gives (input file, batch) is recorded as soon as it is known, so a killed run or a
-- restarted daemon picks the same batch up instead of paying twice.
CREATE TABLE vectorsync.batch_jobs (
    id              bigserial PRIMARY KEY,
    table_name      text NOT NULL REFERENCES vectorsync.embedding_tables (name) ON DELETE CASCADE,
    model           text NOT NULL,                    -- the model fingerprint of its vectors
    buckets         int[] NOT NULL,                   -- the buckets whose sweep waits for it
    swept           int[] NOT NULL DEFAULT '{}',      -- those swept since it was collected
    -- preparing: items recorded, file not yet uploaded (a job killed here is dropped: nothing
    --   was paid); uploaded: input_file_id known; submitted: batch_id known; collected: its
    --   vectors are in batch_vectors (or it ended without them); done: every bucket swept.
    state           text NOT NULL DEFAULT 'preparing'
                    CHECK (state IN ('preparing', 'uploaded', 'submitted', 'collected', 'done')),
    provider_status text,                             -- the batch's status as the provider last said
    input_file_id   text,
    batch_id        text UNIQUE,
    output_file_id  text,
    error_file_id   text,
    items           int NOT NULL DEFAULT 0,
    lines_ok        int NOT NULL DEFAULT 0,
    lines_failed    int NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,        -- what the provider billed for its lines
    price_per_million_tokens float8 NOT NULL DEFAULT 0,  -- the batch price
    list_price_per_million_tokens float8 NOT NULL DEFAULT 0,  -- the synchronous price it saved against
    cost_usd        float8 NOT NULL DEFAULT 0,
    reason          text,                             -- why it ended without all its vectors
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    collected_at    timestamptz
);
CREATE INDEX batch_jobs_open_idx ON vectorsync.batch_jobs (table_name) WHERE state <> 'done';
CREATE INDEX batch_jobs_collected_idx ON vectorsync.batch_jobs (table_name, collected_at);

-- One line of a job: a text hash (its custom_id is the hash in hex) and the bucket that sent it.
CREATE TABLE vectorsync.batch_items (
    job_id      bigint NOT NULL REFERENCES vectorsync.batch_jobs (id) ON DELETE CASCADE,
    text_hash   bytea NOT NULL,
    bucket      int NOT NULL,
    tokens      int NOT NULL,                         -- as counted before sending
    error       text,                                 -- the line's error, if it failed
    PRIMARY KEY (job_id, text_hash)
);

-- The pre-paid embedding cache: vectors of collected jobs by (model fingerprint, text hash). A
-- batch result is never written to a store directly: the ordinary sweep stores rows by looking
-- here before calling the provider, so a row changed or deleted meanwhile is never overwritten.
CREATE TABLE vectorsync.batch_vectors (
    model       text NOT NULL,
    text_hash   bytea NOT NULL,
    job_id      bigint NOT NULL REFERENCES vectorsync.batch_jobs (id) ON DELETE CASCADE,
    embedding   vector NOT NULL,
    PRIMARY KEY (model, text_hash)
);
CREATE INDEX batch_vectors_job_idx ON vectorsync.batch_vectors (job_id);
