-- Idempotent, per declared table: statement-level change capture with transition tables.
-- An UPDATE is logged only for rows whose embedded columns (or key) really changed, so edits of
-- other columns cost one join and no embedding work. Each statement logs one entry per bucket it
-- touched, with the array of its keys there. TRUNCATE logs one sweep request per bucket.
CREATE OR REPLACE FUNCTION {capture_function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {queue} (bucket, row_keys)
        SELECT vectorsync.bucket_of(k, {buckets}), array_agg(k)
        FROM (SELECT {new_key} AS k FROM new_rows n) c
        GROUP BY 1;
    ELSIF TG_OP = 'UPDATE' THEN
        -- One full join finds rows whose text changed, new keys and vanished keys (a key update
        -- logs both its old and its new key).
        INSERT INTO {queue} (bucket, row_keys)
        SELECT vectorsync.bucket_of(k, {buckets}), array_agg(k)
        FROM (
            SELECT CASE WHEN n.{first_key} IS NULL THEN {old_key} ELSE {new_key} END AS k
            FROM new_rows n FULL JOIN old_rows o ON {old_new_join}
            WHERE n.{first_key} IS NULL OR o.{first_key} IS NULL
               OR ({old_values}) IS DISTINCT FROM ({new_values})
        ) c
        GROUP BY 1;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {queue} (bucket, row_keys)
        SELECT vectorsync.bucket_of(k, {buckets}), array_agg(k)
        FROM (SELECT {old_key} AS k FROM old_rows o) c
        GROUP BY 1;
    ELSIF TG_OP = 'TRUNCATE' THEN
        INSERT INTO {queue} (bucket, row_keys)
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
