-- Idempotent. The auditor's view: which rows failed, why, since when, and what is retried.
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
            ELSE 'retrying' END AS state
FROM vectorsync.failures;
