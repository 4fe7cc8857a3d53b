-- Idempotent: re-run by every `vectorsync install`.
-- The partition (hash bucket) of a primary key. The key is given as the jsonb array of its
-- columns' values, so composite keys of any type hash the same way in triggers and sweeps. jsonb's own
-- hash, not a hash of its text: printing every key as text was most of the triggers' cost on bulk writes.
CREATE OR REPLACE FUNCTION vectorsync.bucket_of(row_key jsonb, buckets int)
RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT ((jsonb_hash_extended(row_key, 0) & 2147483647) % buckets)::int $$;
