"""What runs spend and how fresh they keep a table: prices, cost, the daily budget, the
commit-to-embedding lag, and the spend read back from the control schema (vectorsync.runs,
vectorsync.batch_jobs), whose run rows assets/run_ledger.py writes. Free of Dagster: the asset,
`vectorsync sync` and the demo share it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .catalog import ResolvedTable
from .providers.base import ProviderError
from .spec import TableSpec
from .spec_sections import ProviderSpec
from .status import estimated_rows

# US dollars per million input tokens, OpenAI's list prices for its embedding models. A
# declaration's provider.price_per_million_tokens overrides them (a discount, the batch API's
# half price, another vendor); any other model costs 0 unless declared (a local model, or a
# server of your own).
LIST_PRICES: dict[tuple[str, str], float] = {
    ("openai", "text-embedding-3-small"): 0.02,
    ("openai", "text-embedding-3-large"): 0.13,
    ("openai", "text-embedding-ada-002"): 0.10,
}


def price_per_million(provider: ProviderSpec) -> float:
    if provider.price_per_million_tokens is not None:
        return provider.price_per_million_tokens
    # A proxy (LiteLLM) names OpenAI's models with a prefix: openai/text-embedding-3-small.
    return LIST_PRICES.get((provider.kind, provider.model.removeprefix("openai/")), 0.0)


# The provider's batch API (assets/batch_fill.py) bills the same tokens at half the price:
# OpenAI's rule for /v1/batches, applied to the declared price too.
BATCH_DISCOUNT = 0.5


def batch_price_per_million(provider: ProviderSpec) -> float:
    return price_per_million(provider) * BATCH_DISCOUNT


def cost_usd(tokens: int, price_per_million_tokens: float) -> float:
    return tokens * price_per_million_tokens / 1_000_000


@dataclass(frozen=True)
class Lag:
    """Commit-to-embedding lag of the changes cleared, in seconds, weighted by keys."""

    p50: float
    p95: float
    max: float
    changes: int  # keys (a sweep request counts as one)


def lag_of(lags: Iterable[tuple[float, int]]) -> Lag | None:
    """Percentiles of (lag, keys) pairs, each lag counted once per key; None if there are none."""
    ordered = sorted((lag, n) for lag, n in lags if n > 0)
    total = sum(n for _, n in ordered)
    if not total:
        return None

    def at(fraction: float) -> float:
        rank = fraction * total
        seen = 0
        for lag, n in ordered:
            seen += n
            if seen >= rank:
                return lag
        return ordered[-1][0]

    return Lag(at(0.5), at(0.95), ordered[-1][0], total)


class BudgetExceeded(ProviderError):
    """A request that would take the table's spend of the day past its budget: the run stops,
    nothing of what is not yet written is cleared."""

    def __init__(self, table: str, spent: float, request: float, budget: float) -> None:
        super().__init__(
            "budget",
            f"table {table}: daily budget of ${budget:.2f} reached: ${spent:.4f} spent today (UTC), and the "
            f"next request would cost ${request:.4f} more; the remaining changes stay in the change log "
            "until tomorrow or a higher budget.daily_usd",
        )
        self.table, self.spent, self.budget = table, spent, budget

    @property
    def fails_run(self) -> bool:
        return True


# Above this many source rows (by the planner's estimate) the rows a sweep will read are estimated.
EXACT_COUNT_UP_TO = 1_000_000


def rows_to_visit(conn: psycopg.Connection, table: ResolvedTable, buckets: list[int], full: bool) -> int:
    """About how many source rows a run over `buckets` will read, for its progress bar: the keys
    pending in their change log, and every row of the buckets it sweeps (all of them when `full`,
    else those with a sweep request pending, as after an install or a TRUNCATE)."""
    table = table.with_parameters()  # the statements below take parameters: a % in a name is doubled
    pending, marked = conn.execute(
        sql.SQL(
            "SELECT coalesce(sum(cardinality(row_keys)), 0)::bigint, "
            "coalesce(array_agg(DISTINCT bucket) FILTER (WHERE row_keys IS NULL), '{{}}') "
            "FROM {} WHERE bucket = ANY(%s)"
        ).format(table.queue),
        (buckets,),
    ).fetchone()
    swept = buckets if full else marked
    if not swept:
        return pending
    estimate = estimated_rows(conn, table.source)
    if estimate is not None and estimate > EXACT_COUNT_UP_TO:
        return pending + round(estimate * len(swept) / table.spec.buckets)
    in_buckets = conn.execute(
        sql.SQL("SELECT count(*) FROM {} s WHERE {} = ANY(%s)").format(table.source, table.bucket_expr("s")),
        (swept,),
    ).fetchone()[0]
    return pending + in_buckets


def budget_reached(conn: psycopg.Connection, spec: TableSpec) -> str | None:
    """Why no run of the table should start now, if a run stopped at the budget today (UTC) under
    a budget at least as high as the declared one; None otherwise (a raised budget, or a new day,
    lets runs start again)."""
    if spec.budget is None or conn.execute("SELECT to_regclass('vectorsync.runs')").fetchone()[0] is None:
        return None
    found = conn.execute(
        """SELECT (SELECT sum(cost_usd) FROM vectorsync.runs
                   WHERE table_name = %(name)s AND updated_at >= date_trunc('day', now(), 'UTC'))
           FROM vectorsync.runs
           WHERE table_name = %(name)s AND status = 'over_budget' AND budget_usd >= %(budget)s
             AND finished_at >= date_trunc('day', now(), 'UTC')
           LIMIT 1""",
        {"name": spec.name, "budget": spec.budget.daily_usd},
    ).fetchone()
    if found is None:
        return None
    return (f"table {spec.name}: daily budget of ${spec.budget.daily_usd:.2f} reached (${found[0]:.4f} spent "
            "today, UTC): changes wait in the change log until tomorrow or a higher budget.daily_usd")


def spent_today(conn: psycopg.Connection, table_name: str, with_batches_in_flight: bool = False) -> float:
    """The table's spend today (UTC): its runs, and the batches collected today. With
    `with_batches_in_flight`, also what the batches sent and not yet collected will cost at the
    batch price (their tokens were counted when they were sent): money already committed."""
    in_flight = sql.SQL("")
    if with_batches_in_flight and conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0]:
        in_flight = sql.SQL(
            """ + (SELECT coalesce(sum(i.tokens * j.price_per_million_tokens / 1e6), 0)
                   FROM vectorsync.batch_jobs j JOIN vectorsync.batch_items i ON i.job_id = j.id
                   WHERE j.table_name = %(name)s AND j.state IN ('preparing', 'uploaded', 'submitted'))""")
    return conn.execute(
        sql.SQL("""SELECT (SELECT coalesce(sum(cost_usd), 0) FROM vectorsync.runs
                   WHERE table_name = %(name)s AND updated_at >= date_trunc('day', now(), 'UTC'))""")
        + _batch_spend_since(conn, sql.SQL("date_trunc('day', now(), 'UTC')")) + in_flight,
        {"name": table_name},
    ).fetchone()[0]


def _batch_spend_since(conn: psycopg.Connection, since: sql.Composable) -> sql.Composable:
    """`+ what the table's batches were billed since `since`` (nothing before the batch
    migration). A batch's tokens are billed when it is collected, and recorded on its job in the
    transaction that stores its vectors, so a run killed right after still leaves them counted."""
    if conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0] is None:
        return sql.SQL("")
    return sql.SQL(" + (SELECT coalesce(sum(cost_usd), 0) FROM vectorsync.batch_jobs "
                   "WHERE table_name = %(name)s AND collected_at >= {})").format(since)


@dataclass(frozen=True)
class Spend:
    tokens_day: int
    cost_day: float
    tokens_month: int
    cost_month: float
    # What batch mode saved over the last 30 days: its tokens at the synchronous price, less
    # what they cost.
    saved_month: float = 0.0


def spend_by_table(conn: psycopg.Connection) -> dict[str, Spend]:
    """Tokens and cost per table over the last 24 hours and the last 30 days: ordinary requests
    (the run ledger) and collected batches (vectorsync.batch_jobs) alike."""
    if conn.execute("SELECT to_regclass('vectorsync.runs')").fetchone()[0] is None:
        return {}
    batches = conn.execute("SELECT to_regclass('vectorsync.batch_jobs')").fetchone()[0] is not None
    found = conn.execute(
        sql.SQL(
            """SELECT table_name,
                      coalesce(sum(tokens) FILTER (WHERE at >= now() - interval '1 day'), 0)::bigint,
                      coalesce(sum(cost_usd) FILTER (WHERE at >= now() - interval '1 day'), 0),
                      coalesce(sum(tokens), 0)::bigint, coalesce(sum(cost_usd), 0), coalesce(sum(saved), 0)
               FROM (SELECT table_name, updated_at AS at, tokens, cost_usd, 0 AS saved FROM vectorsync.runs
                     {}) AS spent
               WHERE at >= now() - interval '30 days' GROUP BY table_name"""
        ).format(sql.SQL(
            """UNION ALL SELECT table_name, collected_at, tokens, cost_usd,
                   tokens * list_price_per_million_tokens / 1e6 - cost_usd
               FROM vectorsync.batch_jobs WHERE collected_at IS NOT NULL""" if batches else ""))
    ).fetchall()
    return {name: Spend(*figures) for name, *figures in found}
