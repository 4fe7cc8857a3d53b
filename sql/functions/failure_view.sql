-- Idempotent. The auditor's view: which rows failed, why, since when, and what is retried; and
-- which runs failed as a whole (row_key NULL, run_id set). `version` is the table's model version
-- the row failed in (assets/versions.py): a candidate filling beside the active one has its own.
CREATE OR REPLACE VIEW vectorsync.failure_report AS
SELECT table_name,
       row_key,
       bucket,
       error_kind,
       last_error,
       attempts,
       first_failed_at,
       last_failed_at,
       next_attempt_at,
       CASE WHEN dead THEN 'dead'
            WHEN error_kind = 'skipped' THEN 'skipped'
            ELSE 'retrying' END AS state,
       NULL::text AS run_id,
       version
FROM vectorsync.failures
UNION ALL
SELECT table_name,
       NULL,
       NULL,
       'run_failed',
       error,
       1,
       failed_at,
       failed_at,
       NULL,
       'run failed',
       run_id,
       NULL
FROM vectorsync.run_failures;
