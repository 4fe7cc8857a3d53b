-- Failed Dagster runs, recorded by the run-failure sensor, so the auditor's view shows run-level
-- failures (a provider outage, a lost database connection) next to the row-level ledger.
CREATE TABLE vectorsync.run_failures (
    run_id      text PRIMARY KEY,
    job_name    text NOT NULL,
    table_name  text,
    partitions  text,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX run_failures_table_idx ON vectorsync.run_failures (table_name, failed_at);
