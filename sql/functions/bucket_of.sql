-- Idempotent: re-run by every `vectorsync install`.
-- The partition (hash bucket) of a primary key, given as the jsonb array of its columns' values.
-- A one-column key hashes its value the way the triggers and sweeps hash the typed column
-- (catalog.ResolvedTable.bucket_expr): a whole number of up to 18 digits as int8, a string as
-- text (in the C collation, so a column's own collation cannot change the hash); any other key
-- hashes its jsonb. Hashing a jsonb key per written row was a large part of the triggers' cost.
CREATE OR REPLACE FUNCTION vectorsync.bucket_of(row_key jsonb, buckets int)
RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$
SELECT ((CASE
    WHEN jsonb_array_length(row_key) <> 1 THEN jsonb_hash_extended(row_key, 0)
    WHEN jsonb_typeof(row_key -> 0) = 'string' THEN hashtextextended((row_key ->> 0) COLLATE "C", 0)
    -- By value, not by spelling: 5 and 5.0 are one numeric key and must share a bucket.
    WHEN jsonb_typeof(row_key -> 0) = 'number'
         AND (row_key ->> 0)::numeric BETWEEN -999999999999999999 AND 999999999999999999
         AND (row_key ->> 0)::numeric = trunc((row_key ->> 0)::numeric)
        THEN hashint8extended((row_key ->> 0)::numeric::int8, 0)
    ELSE jsonb_hash_extended(row_key, 0)
END & 2147483647) % buckets)::int
$$;
