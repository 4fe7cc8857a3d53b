-- Idempotent: re-run by every `vectorsync install`.
-- Hybrid search over one declared table, for any SQL client: the nearest chunks to a query vector
-- and the chunks matching a full-text query, each reduced to one hit per source row (its best
-- chunk), ranked, and merged by weighted reciprocal rank fusion:
--     score(row) = vector_weight / (rrf_k + vector_rank) + text_weight / (rrf_k + text_rank)
-- where a row missing from one list gets nothing from it, or, when absent_rank is given, is
-- scored there as if ranked absent_rank (so a row found by one side only still competes with one
-- found by both instead of losing half its score). Either query may be NULL, which makes this
-- a plain vector search or a plain full-text search. The caller computes the query vector with the
-- table's model (SQL cannot call it); Python's assets.search does exactly that and calls this.
--
-- The full-text side uses the table's text_search_config and the store's GIN-indexed tsvector
-- column, ranked by ts_rank_cd. The query text is plain text: its words are words, never operators
-- ("image library - Python 3 bindings" does not exclude python; quotes and "or" are punctuation and
-- a stop word). text_match 'all' (the default) matches the chunks with every word; 'any' the chunks
-- with any of them, so a question around a rare identifier still finds it, at the cost of ranking
-- every chunk that shares a common word; 'web' is the one opt-in to operators, web-search syntax
-- (websearch_to_tsquery: "a phrase", or, -exclude).
--
-- The vector side uses the HNSW index when there is one, at the hnsw.ef_search the declaration
-- gives (index.ef_search), set for this call only; with a filter, pgvector's iterative index scan
-- keeps scanning until enough rows pass it.
--
-- `filter` is a jsonb object of source column -> value, all of which must hold:
--     "col": "x"          col = 'x', the text cast to the column's type (so {"id": "7"} and {"id": 7} agree)
--     "col": ["x", "y"]   col is any of them
--     "col": null         col IS NULL
-- Keys must be real columns of the source; values are passed as a query parameter and never spliced
-- into SQL. Identifiers come from the registry and the catalog and are quoted with format('%I').
--
-- Model versions (assets/versions.py): the function answers from the table's ACTIVE version, as
-- vectorsync.embedding_tables names it, read in the same snapshot as the store, so one call never
-- mixes versions. `fingerprint`, when given, is the model the caller embedded its query with: if
-- the active version has another one (a promotion or rollback committed since the caller looked),
-- the call fails with SQLSTATE VS409 instead of comparing vectors of two models, and the caller
-- embeds again with the new active model. `version` answers from that live version instead (an
-- evaluation of a candidate before promotion). Each hit says the model of its chunk.
--
-- SECURITY INVOKER: the caller needs SELECT on vectorsync.embedding_tables, the store and the source,
-- so the function reveals nothing its caller could not read anyway.
-- The signature before the fusion's weights and absent_rank: dropped so that calls by position
-- or name do not find two candidates.
DROP FUNCTION IF EXISTS vectorsync.hybrid_search(text, vector, text, int, jsonb, int, int, text);
-- The signature before model versions (no fingerprint, version or embedding_model).
DROP FUNCTION IF EXISTS vectorsync.hybrid_search(text, vector, text, int, jsonb, int, int, text,
                                                 double precision, double precision, int);
CREATE OR REPLACE FUNCTION vectorsync.hybrid_search(
    table_name      text,
    query_embedding vector,
    query_text      text,
    match_count     int DEFAULT 10,
    filter          jsonb DEFAULT '{}',
    rrf_k           int DEFAULT 60,
    candidates      int DEFAULT NULL,
    text_match      text DEFAULT 'all',
    vector_weight   double precision DEFAULT 1,
    text_weight     double precision DEFAULT 1,
    absent_rank     int DEFAULT NULL,
    fingerprint     text DEFAULT NULL,
    version         int DEFAULT NULL
)
RETURNS TABLE (
    row_key         jsonb,             -- the source row's primary key, as a jsonb array
    score           double precision,  -- the RRF score (higher is better)
    vector_rank     int,               -- the row's rank by vector distance, NULL if not a candidate
    text_rank       int,               -- the row's rank by full-text relevance, NULL if no match
    vector_distance double precision,  -- distance of its best chunk, in the table's metric
    text_score      real,              -- ts_rank_cd of its best matching chunk
    chunk           text,              -- the chunk that ranked the row best
    source_row      jsonb,             -- the source row, as to_jsonb
    embedding_model text               -- the fingerprint of the model that embedded `chunk`
)
LANGUAGE plpgsql STABLE
-- A fixed search_path, so the caller's cannot redirect a name; pgvector's names are qualified below.
SET search_path = pg_catalog, pg_temp
-- A filter makes HNSW keep scanning until enough rows pass, instead of stopping at ef_search;
-- 'relaxed_order' is enough because the candidates are re-ranked by exact distance below.
SET hnsw.iterative_scan = relaxed_order
-- Declared here so that the set_config below, which applies the declaration's index.ef_search,
-- is undone when the function returns instead of lasting for the caller's transaction; 200 is that
-- field's default (assets/spec.py), for a registry entry written before the field existed.
SET hnsw.ef_search = 200
AS $body$
DECLARE
    reg           record;
    src           regclass;
    label         text;        -- how errors name the table
    vec_schema    text;        -- where pgvector lives
    vec_type      text;        -- the store's embedding type, e.g. public.vector(384)
    op            text;
    ts_config     regconfig;
    ts_query      tsquery;
    limit_per     int;
    key_cols      text[];
    key_json      text;
    key_join      text;
    source_join   text := '';
    predicates    text[] := '{}';
    filter_sql    text := '';
    vector_sql    text;
    text_sql      text;
    col           record;
    f_key         text;
    f_value       jsonb;
    dims          int;
    reason        text;
BEGIN
    label := format('vectorsync.hybrid_search: table %s', quote_literal(table_name));
    SELECT * INTO reg FROM vectorsync.embedding_tables t WHERE t.name = hybrid_search.table_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%: not installed', label
            USING ERRCODE = 'undefined_object', HINT = 'run `vectorsync install` with its declaration';
    END IF;
    IF hybrid_search.version IS NOT NULL THEN
        SELECT v.store_schema, v.store_table, v.spec, v.fingerprint
          INTO reg.store_schema, reg.store_table, reg.spec, reg.fingerprint
          FROM vectorsync.versions v
         WHERE v.table_name = hybrid_search.table_name AND v.version = hybrid_search.version
           AND v.state <> 'retired';
        IF NOT FOUND THEN
            RAISE EXCEPTION '%: has no live version %', label, hybrid_search.version
                USING ERRCODE = 'undefined_object';
        END IF;
    END IF;
    IF hybrid_search.fingerprint IS NOT NULL AND hybrid_search.fingerprint <> reg.fingerprint THEN
        RAISE EXCEPTION '%: the query was embedded with %, the version searched is %', label,
            hybrid_search.fingerprint, reg.fingerprint
            USING ERRCODE = 'VS409', HINT = 'embed the query with the active version''s model and search again';
    END IF;
    IF match_count IS NULL OR match_count < 1 THEN
        RAISE EXCEPTION '%: match_count must be at least 1, not %', label, match_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rrf_k IS NULL OR rrf_k < 0 THEN
        RAISE EXCEPTION '%: rrf_k must be 0 or more, not %', label, rrf_k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF candidates IS NOT NULL AND candidates < 1 THEN
        RAISE EXCEPTION '%: candidates must be at least 1, not %', label, candidates
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF text_match IS NULL OR text_match NOT IN ('any', 'all', 'web') THEN
        RAISE EXCEPTION '%: text_match must be ''all'', ''any'' or ''web'', not %', label,
            quote_nullable(text_match) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF vector_weight IS NULL OR vector_weight < 0 OR text_weight IS NULL OR text_weight < 0 THEN
        RAISE EXCEPTION '%: vector_weight and text_weight must be 0 or more, not % and %', label,
            quote_nullable(vector_weight), quote_nullable(text_weight) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF absent_rank IS NOT NULL AND absent_rank < 1 THEN
        RAISE EXCEPTION '%: absent_rank must be at least 1, not %', label, absent_rank
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reg.spec -> 'index' ->> 'ef_search' IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', reg.spec -> 'index' ->> 'ef_search', true);
    END IF;
    -- Visible with SET client_min_messages = debug1: which graph search width a call really used.
    RAISE DEBUG '%: hnsw.ef_search = %', label, current_setting('hnsw.ef_search');
    IF query_embedding IS NULL AND query_text IS NULL THEN
        RAISE EXCEPTION '%: give a query vector, a query text, or both', label
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    filter := coalesce(filter, '{}');
    IF jsonb_typeof(filter) <> 'object' THEN
        RAISE EXCEPTION '%: filter must be a jsonb object of column -> value, not %', label,
            jsonb_typeof(filter) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Rows have several chunks: by default take enough chunks to find match_count distinct rows.
    limit_per := coalesce(candidates, greatest(match_count * 8, 40));

    src := to_regclass(format('%I.%I', reg.source_schema, reg.source_table));
    IF src IS NULL THEN
        RAISE EXCEPTION '%: source %.% does not exist', label, reg.source_schema, reg.source_table
            USING ERRCODE = 'undefined_table';
    END IF;
    key_cols := reg.key_columns;
    SELECT string_agg(format('e.%I', k), ', ' ORDER BY i),
           string_agg(format('e.%I = s.%I', k, k), ' AND ' ORDER BY i)
      INTO key_json, key_join
      FROM unnest(key_cols) WITH ORDINALITY AS u(k, i);
    key_json := format('jsonb_build_array(%s)', key_json);

    -- Filter: every key a real column of the source, every value castable to its type.
    FOR f_key, f_value IN SELECT * FROM jsonb_each(filter) LOOP
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type_sql, t.typcategory
          INTO col
          FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = src AND a.attname = f_key AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            reason := format('%I.%I has no such column', reg.source_schema, reg.source_table);
            RAISE EXCEPTION '%: filter field %: %', label, quote_ident(f_key), reason
                USING ERRCODE = 'undefined_column', DETAIL = reason, COLUMN = f_key, TABLE = table_name;
        END IF;
        IF jsonb_typeof(f_value) = 'null' THEN
            predicates := predicates || format('s.%I IS NULL', f_key);
            CONTINUE;
        END IF;
        IF jsonb_typeof(f_value) = 'array' AND col.typcategory = 'A' THEN
            reason := format('the column is an array (%s): give one array literal such as "{a,b}", '
                             'not a list', col.type_sql);
            RAISE EXCEPTION '%: filter field %: %', label, quote_ident(f_key), reason
                USING ERRCODE = 'invalid_parameter_value', DETAIL = reason, COLUMN = f_key, TABLE = table_name;
        END IF;
        -- Cast and compare once here, so a bad value or a type without `=` (json, xml, point) is
        -- reported with the table and field instead of failing inside the search query.
        BEGIN
            IF jsonb_typeof(f_value) = 'array' THEN
                EXECUTE format('SELECT bool_and(v::%s = v::%s) FROM jsonb_array_elements_text($1) v',
                               col.type_sql, col.type_sql) USING f_value;
                predicates := predicates || format(
                    's.%I = ANY (ARRAY(SELECT v::%s FROM jsonb_array_elements_text($3 -> %L) v))',
                    f_key, col.type_sql, f_key);
            ELSE
                EXECUTE format('SELECT ($1 #>> ''{}'')::%s = ($1 #>> ''{}'')::%s', col.type_sql, col.type_sql)
                    USING f_value;
                predicates := predicates || format('s.%I = ($3 ->> %L)::%s', f_key, f_key, col.type_sql);
            END IF;
        EXCEPTION
            WHEN undefined_function THEN
                reason := format('type %s has no = operator, so it cannot be filtered on', col.type_sql);
                RAISE EXCEPTION '%: filter field %: %', label, quote_ident(f_key), reason
                    USING ERRCODE = 'undefined_function', DETAIL = reason, COLUMN = f_key, TABLE = table_name;
            WHEN data_exception THEN
                reason := format('%s is not a valid %s (%s)', f_value, col.type_sql, SQLERRM);
                RAISE EXCEPTION '%: filter field %: %', label, quote_ident(f_key), reason
                    USING ERRCODE = SQLSTATE, DETAIL = reason, COLUMN = f_key, TABLE = table_name;
        END;
    END LOOP;
    IF cardinality(predicates) > 0 THEN
        -- Filtering needs the source row; without a filter the store alone keeps HNSW in play.
        source_join := format(' JOIN %s s ON %s', src, key_join);
        filter_sql := ' AND ' || array_to_string(predicates, ' AND ');
    END IF;

    IF query_embedding IS NULL THEN
        vector_sql := 'SELECT NULL::jsonb AS row_key, NULL::text AS chunk, NULL::text AS model, NULL::float8 AS distance WHERE false';
    ELSE
        SELECT n.nspname INTO vec_schema
          FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace WHERE x.extname = 'vector';
        SELECT format_type(a.atttypid, a.atttypmod) INTO vec_type
          FROM pg_attribute a
         WHERE a.attrelid = to_regclass(format('%I.%I', reg.store_schema, reg.store_table))
           AND a.attname = 'embedding';
        IF vec_type IS NULL THEN
            RAISE EXCEPTION '%: store %.% does not exist', label, reg.store_schema, reg.store_table
                USING ERRCODE = 'undefined_table';
        END IF;
        EXECUTE format('SELECT %I.vector_dims($1)', vec_schema) INTO dims USING query_embedding;
        IF dims <> (reg.spec -> 'provider' ->> 'dimensions')::int THEN
            RAISE EXCEPTION '%: the query vector has % dimensions, the table''s model gives %', label,
                dims, reg.spec -> 'provider' ->> 'dimensions' USING ERRCODE = 'data_exception';
        END IF;
        op := format('OPERATOR(%I.%s)', vec_schema, CASE reg.spec ->> 'distance'
            WHEN 'l2' THEN '<->' WHEN 'inner_product' THEN '<#>' ELSE '<=>' END);
        vector_sql := format(
            'SELECT %1$s AS row_key, e.chunk, e.model, (e.embedding %2$s $1::%3$s)::float8 AS distance
               FROM %4$I.%5$I e%6$s
              WHERE true%7$s
              ORDER BY e.embedding %2$s $1::%3$s
              LIMIT $4',
            key_json, op, vec_type, reg.store_schema, reg.store_table, source_join, filter_sql);
    END IF;

    IF query_text IS NOT NULL THEN
        ts_config := coalesce(reg.spec ->> 'text_search_config', 'english')::regconfig;
        IF text_match = 'web' THEN
            ts_query := websearch_to_tsquery(ts_config, query_text);
        ELSIF text_match = 'all' THEN
            -- plainto_tsquery reads no operator: '-', quotes, 'or' and '!' are not syntax.
            ts_query := plainto_tsquery(ts_config, query_text);
        ELSE
            -- Any word: the query's lexemes OR-ed, so a question that wraps a rare identifier in
            -- other words still finds the rows that contain it (and ranks higher those that have
            -- more of the words). Compound tokens (a_b, x.y) keep their phrase operator. Replacing
            -- the operator in the text form is safe: lexemes never contain spaces, and a tsquery's
            -- text form reads back as the same tsquery.
            ts_query := plainto_tsquery(ts_config, query_text);
            IF numnode(ts_query) > 1 THEN
                ts_query := replace(ts_query::text, ' & ', ' | ')::tsquery;
            END IF;
        END IF;
    END IF;
    IF ts_query IS NULL OR numnode(ts_query) = 0 THEN
        -- No query text, or only stop words and punctuation: nothing to match on.
        text_sql := 'SELECT NULL::jsonb AS row_key, NULL::text AS chunk, NULL::text AS model, NULL::real AS text_score WHERE false';
    ELSE
        -- chunk_tsv is the store's generated tsvector column, GIN-indexed; ranking costs one
        -- ts_rank_cd per matching chunk, so broad queries over big tables cost the most.
        text_sql := format(
            'SELECT %1$s AS row_key, e.chunk, e.model, ts_rank_cd(e.chunk_tsv, $2) AS text_score
               FROM %2$I.%3$I e%4$s
              WHERE e.chunk_tsv @@ $2%5$s
              ORDER BY text_score DESC
              LIMIT $4',
            key_json, reg.store_schema, reg.store_table, source_join, filter_sql);
    END IF;

    RETURN QUERY EXECUTE format(
        $q$
        -- Ranks are 1-based and ties share one (1, 2, 2, 4): rows that match equally well, such as
        -- every chunk holding the query's one word once, get the same share instead of an order
        -- invented from their keys.
        WITH vector_hits AS MATERIALIZED (%1$s),
             vector_ranked AS (
                 SELECT b.*, rank() OVER (ORDER BY b.distance)::int AS rank
                 FROM (SELECT DISTINCT ON (row_key) * FROM vector_hits ORDER BY row_key, distance) b),
             text_hits AS MATERIALIZED (%2$s),
             text_ranked AS (
                 SELECT b.*, rank() OVER (ORDER BY b.text_score DESC)::int AS rank
                 FROM (SELECT DISTINCT ON (row_key) * FROM text_hits ORDER BY row_key, text_score DESC) b),
             fused AS (
                 SELECT coalesce(v.row_key, t.row_key) AS row_key,
                        coalesce($7 / ($5 + coalesce(v.rank, $9)), 0)
                          + coalesce($8 / ($5 + coalesce(t.rank, $10)), 0) AS score,
                        v.rank AS vector_rank, t.rank AS text_rank, v.distance, t.text_score,
                        CASE WHEN v.rank IS NULL OR t.rank < v.rank THEN t.chunk ELSE v.chunk END AS chunk,
                        CASE WHEN v.rank IS NULL OR t.rank < v.rank THEN t.model ELSE v.model END AS model
                 FROM vector_ranked v FULL JOIN text_ranked t ON t.row_key = v.row_key)
        SELECT f.row_key, f.score, f.vector_rank, f.text_rank, f.distance, f.text_score, f.chunk,
               to_jsonb(s.*), f.model
        FROM fused f JOIN %3$s s ON %4$s
        -- Equal scores: the row with the better single rank first, then the vector side's.
        ORDER BY f.score DESC, least(f.vector_rank, f.text_rank), f.vector_rank NULLS LAST, f.row_key
        LIMIT $6
        $q$,
        vector_sql, text_sql, src,
        (SELECT string_agg(format('s.%I = (f.row_key ->> %s)::%s', a.attname, u.i - 1,
                                  format_type(a.atttypid, a.atttypmod)), ' AND ' ORDER BY u.i)
           FROM unnest(key_cols) WITH ORDINALITY AS u(k, i)
           JOIN pg_attribute a ON a.attrelid = src AND a.attname = u.k))
    USING query_embedding, ts_query, filter, limit_per, rrf_k::float8, match_count,
          vector_weight, text_weight,
          -- A side that did not run (no vector, or no words to match) gives no row anything.
          CASE WHEN query_embedding IS NOT NULL THEN absent_rank::float8 END,
          CASE WHEN ts_query IS NOT NULL AND numnode(ts_query) > 0 THEN absent_rank::float8 END;
END
$body$;
