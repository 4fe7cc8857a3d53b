"""a. Pipeline throughput with the local model, against the same model embedding the same texts
with the same batch size directly (no database, no change log, no hashing)."""

from __future__ import annotations

from bench.common import (
    Benchmark,
    Context,
    Measure,
    Result,
    body_text,
    create_source,
    declare,
    load_rows,
    reset_store,
    sync_all,
    timed,
)

SCHEMA = "bench_throughput"


def run(ctx: Context) -> Result:
    from assets.engine import EmbeddingEngine
    from assets.providers import provider_for
    from assets.text import render

    rows, chars = ctx.params["rows"], ctx.params["chars"]
    conn = ctx.connect()
    create_source(conn, SCHEMA, "id int PRIMARY KEY, title text, body text")
    data = [(i, f"Title {i}", body_text(i, chars)) for i in range(rows)]
    load_rows(conn, SCHEMA, data, ["id", "title", "body"])
    spec, table = declare(conn, SCHEMA, template="{title}\n\n{body}",
                          provider={"batch_size": ctx.params["batch_size"]})
    provider = provider_for(spec.provider)
    texts = [render(spec.template_parts, {"title": t, "body": b}) for _, t, b in data]
    assert all(len(t) <= spec.chunking.size for t in texts), "one chunk per row keeps the comparison exact"
    encode_batch = provider.encode_batch_size

    def direct() -> None:
        provider.model.encode(texts, batch_size=encode_batch, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=False)

    engine = EmbeddingEngine(conn, table, provider)
    provider.model.encode(texts[:encode_batch], batch_size=encode_batch)  # warm up torch
    subject, baseline, in_model = [], [], []
    try:
        for r in range(ctx.rounds):
            # Alternate which side goes first, so warmth or drift on a shared machine favours neither.
            for side in (("direct", "engine") if r % 2 == 0 else ("engine", "direct")):
                if side == "direct":
                    seconds, _ = timed(direct)
                    baseline.append(rows / seconds)
                    continue
                reset_store(conn, table)
                seconds, stats = timed(lambda: sync_all(engine, spec.buckets, full=True))
                assert stats.chunks_embedded == rows and stats.rows_written == rows, stats
                subject.append(rows / seconds)
                in_model.append(stats.provider_seconds / seconds)
            ctx.log(f"round {r + 1}: direct {baseline[-1]:.1f} rows/s, engine {subject[-1]:.1f} rows/s, "
                    f"{in_model[-1]:.1%} of the engine's time inside the model")
    finally:
        engine.close()
        conn.close()
    return Result(
        measures=[Measure("rows/s, local model", "rows/s", subject, baseline, "ratio >= 0.9"),
                  Measure("share of the engine's time inside the model", "fraction", in_model)],
        params={**ctx.params, "encode_batch_size": encode_batch, "buckets": spec.buckets,
                "page_size": spec.page_size, "hnsw_index": True},
        notes=[("subject: a full run over every bucket of a freshly emptied store (HNSW index kept); "
               "baseline: SentenceTransformer.encode of the same rendered texts at the same batch size")],
    ).check(lambda m: m.ratio is not None and m.ratio >= 0.9)


BENCHMARK = Benchmark(
    name="a", title="pipeline throughput, local model", target="engine/direct >= 0.9",
    run=run, defaults={"rows": 1000, "chars": 500, "batch_size": 256}, quick={"rows": 200},
)
