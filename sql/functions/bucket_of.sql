-- Idempotent: re-run by every `vectorsync install`.
-- The partition (hash bucket) of a primary key. The key is given as the jsonb array of its
-- columns' values, so composite keys of any type hash the same way in triggers, sweeps and Python.
CREATE OR REPLACE FUNCTION vectorsync.bucket_of(row_key jsonb, buckets int)
RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT ((hashtextextended(row_key::text, 0) & 2147483647) % buckets)::int $$;
