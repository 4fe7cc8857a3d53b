-- Idempotent, per declared table with `capture: logical` (assets/wal_capture.py): the WAL carries
-- the changes, so the capture function only sends the NOTIFY that wakes continuous mode. The
-- triggers keep the names of sql/table/capture.sql, which CREATE OR REPLACE swaps in either
-- direction, and hold no transition tables: their cost is one call per statement, whatever the
-- number of rows. An UPDATE wakes only when it sets a column some live version renders, or a key.
CREATE OR REPLACE FUNCTION {capture_function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    PERFORM pg_notify('vectorsync_changes', {table_name});
    RETURN NULL;
END
$body$;

CREATE OR REPLACE TRIGGER {insert_trigger} AFTER INSERT ON {source}
    FOR EACH STATEMENT EXECUTE FUNCTION {capture_function}();
CREATE OR REPLACE TRIGGER {update_trigger} AFTER UPDATE OF {watched_columns} ON {source}
    FOR EACH STATEMENT EXECUTE FUNCTION {capture_function}();
CREATE OR REPLACE TRIGGER {delete_trigger} AFTER DELETE ON {source}
    FOR EACH STATEMENT EXECUTE FUNCTION {capture_function}();
CREATE OR REPLACE TRIGGER {truncate_trigger} AFTER TRUNCATE ON {source}
    FOR EACH STATEMENT EXECUTE FUNCTION {capture_function}();
