-- What each run did and spent, per run and per bucket: `vectorsync status` sums tokens and cost
-- over the last day and month from here, and a table's daily budget is checked against it.
-- Written by the runs themselves as they go (a run killed halfway keeps what it recorded), so
-- the spend of a run that failed or was stopped by its budget is counted too.
CREATE TABLE vectorsync.runs (
    run_id          text NOT NULL,
    table_name      text NOT NULL,
    trigger         text NOT NULL DEFAULT '',
    buckets         int[] NOT NULL DEFAULT '{}',
    model           text NOT NULL DEFAULT '',
    price_per_million_tokens float8 NOT NULL DEFAULT 0,
    budget_usd      float8,                           -- the table's daily budget when it ran
    status          text NOT NULL DEFAULT 'running',  -- running, succeeded, failed, over_budget
    reason          text,
    rows_expected   bigint,                           -- source rows a sweep will read (estimate)
    rows_seen       bigint NOT NULL DEFAULT 0,
    rows_written    bigint NOT NULL DEFAULT 0,
    chunks_embedded bigint NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    cost_usd        float8 NOT NULL DEFAULT 0,
    changes_cleared bigint NOT NULL DEFAULT 0,
    lag_p50_seconds float8,
    lag_p95_seconds float8,
    lag_max_seconds float8,
    started_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (run_id, table_name)
);
CREATE INDEX runs_table_time_idx ON vectorsync.runs (table_name, updated_at);

CREATE TABLE vectorsync.run_buckets (
    run_id          text NOT NULL,
    table_name      text NOT NULL,
    bucket          int NOT NULL,
    rows_seen       bigint NOT NULL DEFAULT 0,
    rows_written    bigint NOT NULL DEFAULT 0,
    rows_deleted    bigint NOT NULL DEFAULT 0,
    rows_skipped    bigint NOT NULL DEFAULT 0,
    rows_failed     bigint NOT NULL DEFAULT 0,
    chunks_embedded bigint NOT NULL DEFAULT 0,
    chunks_reused   bigint NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    cost_usd        float8 NOT NULL DEFAULT 0,
    changes_cleared bigint NOT NULL DEFAULT 0,
    lag_max_seconds float8,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, table_name, bucket)
);
