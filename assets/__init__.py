"""What vectorsync computes: table declarations, the embedding engine, providers, and the
Dagster assets and checks built from them."""
