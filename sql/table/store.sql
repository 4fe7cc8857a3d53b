-- Idempotent, per model version of a declared table (assets/versions.py): its store and change log. Placeholders are filled by psycopg.sql, which quotes every
-- identifier, so hostile table and column names are harmless.
CREATE SCHEMA IF NOT EXISTS {store_schema};

-- One row per chunk. The key columns copy the source's primary key (names and types); there is no
-- foreign key to the source, so the user's TRUNCATE and DELETE behave exactly as before.
CREATE TABLE IF NOT EXISTS {store} (
    {key_definitions},
    chunk_seq   int NOT NULL,
    chunk       text NOT NULL,
    text_hash   bytea NOT NULL,
    model       text NOT NULL,
    bucket      int NOT NULL,
    embedding   {vector_type} NOT NULL,
    embedded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ({key_columns}, chunk_seq)
);
-- The embedding cache: the same (model, text) is looked up here before any provider call.
CREATE INDEX IF NOT EXISTS {hash_index} ON {store} (text_hash);
CREATE INDEX IF NOT EXISTS {bucket_index} ON {store} (bucket);

-- The change log: one entry per statement and bucket, holding the array of the keys (each a jsonb
-- array of key values) that statement changed in that bucket (NULL asks for a sweep of the bucket). An entry
-- per key made a bulk statement cost one more indexed row per row, doubling its time; an entry
-- per bucket costs 16 rows. An entry leaves the log only in the transaction that writes the
-- embedding (or records the failure) of its last key.
CREATE TABLE IF NOT EXISTS {queue} (
    id        bigserial PRIMARY KEY,
    bucket    int NOT NULL,
    row_keys  jsonb[],
    queued_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS {queue_bucket_index} ON {queue} (bucket, id);
-- A log of an earlier version held one key per row in `row_key`: each becomes a one-key entry.
DO $log$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass({queue_qualified})
               AND attname = 'row_key' AND NOT attisdropped) THEN
        ALTER TABLE {queue} RENAME COLUMN row_key TO row_keys;
        ALTER TABLE {queue} ALTER COLUMN row_keys TYPE jsonb[]
            USING CASE WHEN row_keys IS NOT NULL THEN ARRAY[row_keys] END;
    END IF;
END
$log$;

-- The full-text side of hybrid search: each chunk's tsvector, in the declared text search
-- configuration, kept by PostgreSQL as a stored generated column (ranking reads it instead of
-- parsing every matching chunk again, several times faster) with a GIN index. A changed
-- configuration replaces the column and its index; an unchanged one takes no lock here.
DO $fts$
DECLARE
    store regclass := to_regclass({store_qualified});
    config text := {text_search_config}::regconfig::text;
    current_expression text;
BEGIN
    SELECT pg_get_expr(d.adbin, d.adrelid) INTO current_expression
      FROM pg_attribute a JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = store AND a.attname = 'chunk_tsv' AND NOT a.attisdropped;
    IF current_expression IS NOT NULL
       AND position(quote_literal(config) || '::regconfig' IN current_expression) = 0 THEN
        ALTER TABLE {store} DROP COLUMN chunk_tsv;  -- and its index with it
        current_expression := NULL;
    END IF;
    -- An index over an expression rather than the column (installs of an earlier version).
    IF EXISTS (SELECT 1 FROM pg_index i WHERE i.indexrelid = to_regclass({fts_index_qualified})
               AND i.indexprs IS NOT NULL) THEN
        DROP INDEX {store_schema}.{fts_index};
    END IF;
    IF current_expression IS NULL THEN
        ALTER TABLE {store} ADD COLUMN chunk_tsv tsvector
            GENERATED ALWAYS AS (to_tsvector({text_search_config}::regconfig, chunk)) STORED;
    END IF;
END
$fts$;
CREATE INDEX IF NOT EXISTS {fts_index} ON {store} USING gin (chunk_tsv);
