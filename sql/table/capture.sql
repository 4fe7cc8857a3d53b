-- Idempotent, per declared table: statement-level change capture with transition tables.
-- An UPDATE is logged only for rows whose embedded columns (or key) really changed, so edits of
-- other columns cost one join and no embedding work. TRUNCATE logs one sweep request per bucket.
CREATE OR REPLACE FUNCTION {capture_function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {queue} (bucket, row_key)
        SELECT vectorsync.bucket_of(k, {buckets}), k
        FROM (SELECT {new_key} AS k FROM new_rows n) c;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {queue} (bucket, row_key)
        SELECT vectorsync.bucket_of(k, {buckets}), k
        FROM (
            SELECT {new_key} AS k
            FROM new_rows n LEFT JOIN old_rows o ON {old_new_join}
            WHERE o.{first_key} IS NULL OR ({old_values}) IS DISTINCT FROM ({new_values})
            UNION ALL
            SELECT {old_key}
            FROM old_rows o
            WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE {old_new_join})
        ) c;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {queue} (bucket, row_key)
        SELECT vectorsync.bucket_of(k, {buckets}), k
        FROM (SELECT {old_key} AS k FROM old_rows o) c;
    ELSIF TG_OP = 'TRUNCATE' THEN
        INSERT INTO {queue} (bucket, row_key)
        SELECT b, NULL FROM generate_series(0, {buckets} - 1) b;
    END IF;
    PERFORM pg_notify('vectorsync_changes', {table_name});
    RETURN NULL;
END
$body$;

CREATE OR REPLACE TRIGGER {insert_trigger} AFTER INSERT ON {source}
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {capture_function}();
CREATE OR REPLACE TRIGGER {update_trigger} AFTER UPDATE ON {source}
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {capture_function}();
CREATE OR REPLACE TRIGGER {delete_trigger} AFTER DELETE ON {source}
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {capture_function}();
CREATE OR REPLACE TRIGGER {truncate_trigger} AFTER TRUNCATE ON {source}
    FOR EACH STATEMENT EXECUTE FUNCTION {capture_function}();
