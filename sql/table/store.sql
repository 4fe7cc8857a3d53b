-- Idempotent, per declared table. Placeholders are filled by psycopg.sql, which quotes every
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

-- The change log: one row per changed key (a NULL key asks for a sweep of the whole bucket).
-- A row leaves it only in the transaction that writes the key's embedding or records its failure.
CREATE TABLE IF NOT EXISTS {queue} (
    id        bigserial PRIMARY KEY,
    bucket    int NOT NULL,
    row_key   jsonb,
    queued_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS {queue_bucket_index} ON {queue} (bucket, id);

CREATE OR REPLACE VIEW {view} AS
SELECT s.*,
       e.chunk_seq,
       e.chunk,
       e.embedding,
       e.model AS embedding_model,
       e.embedded_at
FROM {store} e
JOIN {source} s ON {store_source_join};

-- The full-text side of hybrid search: an expression index over the chunk text, in the declared
-- text search configuration (search queries repeat this exact expression, so the index applies).
-- A changed configuration replaces the index, since its expression no longer matches the queries.
DO $fts$
BEGIN
    IF position(quote_literal({text_search_config}::regconfig::text) || '::regconfig'
                IN coalesce(pg_get_indexdef(to_regclass({fts_index_qualified})), '')) = 0 THEN
        DROP INDEX IF EXISTS {store_schema}.{fts_index};
    END IF;
END
$fts$;
CREATE INDEX IF NOT EXISTS {fts_index} ON {store}
    USING gin (to_tsvector({text_search_config}::regconfig, chunk));
