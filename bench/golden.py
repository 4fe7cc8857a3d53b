"""golden: search quality of the demo table on its golden queries (orchestration/defs/python_docs/
golden.yaml, assets/evaluation.py): recall@10 and MRR@10 with the local model, through the table's
own search (HNSW) and by an exact scan of its store, and hybrid; the same metrics on the 85
labelled queries of the search benchmark, as a check of the metric code against bench/search.py;
and what filling the demo table costs (assets/estimate.py).

The table is the search benchmark's (bench/_search_corpus.py) without filler rows: the demo's
declaration over Python's documentation, embedded with the local model (restored from the
benchmark's cache when it has run before), HNSW-indexed.
"""

from __future__ import annotations

from pathlib import Path

from assets.estimate import estimate_fill
from assets.evaluation import Metrics, compare, evaluate, store_search, table_search
from assets.golden import GoldenQuery, GoldenSet, check_answers, key_text, load_golden
from assets.providers import provider_for
from bench._search_corpus import build, labelled_queries
from bench.common import Benchmark, Context, Measure, Result

GOLDEN = Path(__file__).resolve().parent.parent / "orchestration" / "defs" / "python_docs" / "golden.yaml"


def run(ctx: Context) -> Result:
    spec, table = build(ctx, 0)
    conn = ctx.connect()
    provider = provider_for(spec.provider)
    columns = [c.name for c in table.key]
    checked = check_answers(conn, table, load_golden(GOLDEN, columns))
    for line in checked.describe():
        ctx.log(line)
    labelled = GoldenSet("bench/data/python_docs_queries.json", tuple(
        GoldenQuery(q["query"], tuple(key_text([k]) for k in q["relevant"]), f"entry {i}")
        for i, q in enumerate(labelled_queries(), 1)))
    store = table.with_parameters().store
    ways = {
        "search (HNSW)": table_search(conn, table, provider),
        "exact scan": store_search(conn, table, store, provider, exact=True),
        "hybrid": table_search(conn, table, provider, hybrid=True),
    }
    figures: dict[str, dict[str, Metrics]] = {}
    for name, golden in (("golden", checked.golden), ("labelled", check_answers(conn, table, labelled).golden)):
        figures[name] = {way: evaluate(golden, search) for way, search in ways.items()}
        for way, m in figures[name].items():
            ctx.log(f"{name} ({m.queries} queries), {way}: recall@10 {m.recall_at_k:.4f}, MRR@10 {m.mrr_at_10:.4f}")
    misses = [s.query for s in figures["golden"]["search (HNSW)"].per_query if s.recall < 1]
    fresh = estimate_fill(conn, table)
    again = estimate_fill(conn, table, [store])
    conn.close()
    g = figures["golden"]
    gate = compare(g["exact scan"], g["search (HNSW)"], 0.0)
    measures = [Measure(f"{name}: {metric}, {way}", "fraction", [value])
                for name, by_way in figures.items() for way, m in by_way.items()
                for metric, value in (("recall@10", m.recall_at_k), ("MRR@10", m.mrr_at_10))]
    measures += [Measure("estimate of the demo table, nothing reused", "s", [fresh.seconds]),
                 Measure("demo table: tokens to embed from scratch", "tokens", [fresh.tokens])]
    return Result(
        measures=measures, params={**ctx.params, "golden_queries": len(checked.golden.queries)},
        notes=[f"golden answers missing from the source: {len(checked.missing)}",
               f"golden queries not fully answered in the top 10 (HNSW): {misses}",
               f"gate, HNSW as the candidate against the exact scan, max_drop 0: {gate.reason}",
               f"estimate from scratch: {fresh.as_dict()}", f"estimate reusing its store: {again.as_dict()}"],
        extra={name: {way: {"recall@10": m.recall_at_k, "mrr@10": m.mrr_at_10, "queries": m.queries}
                      for way, m in by_way.items()} for name, by_way in figures.items()},
    )


BENCHMARK = Benchmark(
    name="golden", title="the demo's golden queries: recall@10 and MRR@10 with the local model; the demo's fill estimate",
    target="", run=run, defaults={}, quick={}, rounds=1,
)
