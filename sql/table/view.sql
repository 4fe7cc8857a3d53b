-- Idempotent, per declared table: the view of the ACTIVE model version's store joined to the source.
-- Install replaces it in place; promotion and rollback (assets/promotion.py) drop and recreate it in
-- their switch transaction, since the embedding column's type may differ between versions.
CREATE OR REPLACE VIEW {view} AS
SELECT s.*,
       e.chunk_seq,
       e.chunk,
       e.embedding,
       e.model AS embedding_model,
       e.embedded_at
FROM {store} e
JOIN {source} s ON {store_source_join};

