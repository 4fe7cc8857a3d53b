"""Search quality of a table's model versions on its golden queries, and the promotion gate built
on it. Free of Dagster.

Each version is scored on its own store with its own query model (evaluation.store_search), so the
active and the candidate are compared as each would answer once active. Expected rows that are no
longer in the source are left out of both scores and reported (golden.check_answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg

from . import versions
from .catalog import ResolvedTable
from .evaluation import GateResult, Metrics, compare, evaluate, store_search
from .golden import AnswerCheck, check_answers, golden_from_sql, load_golden
from .promotion import ActiveAndCandidate, Gate
from .providers import provider_for


def golden_path(declared: ResolvedTable) -> Path | None:
    """The declared golden file, relative to the declaration's own file (or the working directory
    for a declaration made in Python)."""
    name = declared.spec.versions.golden
    if name is None:
        return None
    path = Path(name)
    origin = Path(declared.origin)
    if not path.is_absolute() and origin.suffix in (".yaml", ".yml"):
        path = origin.parent / path
    return path


def golden_answers(conn: psycopg.Connection, declared: ResolvedTable) -> AnswerCheck | None:
    """The table's golden queries with the answers still in the source; None when none are declared."""
    spec = declared.spec.versions
    columns = [c.name for c in declared.key]
    path = golden_path(declared)
    if path is not None:
        golden = load_golden(path, key_columns=columns)
    elif spec.golden_sql is not None:
        golden = golden_from_sql(conn, spec.golden_sql, columns)
    else:
        return None
    return check_answers(conn, declared, golden)


def version_quality(conn: psycopg.Connection, vt: versions.VersionTable, answers: AnswerCheck, k: int) -> Metrics:
    """recall@k and MRR@10 of one version: its store, searched with its own query model."""
    table = vt.table
    search = store_search(conn, table, table.with_parameters().store, provider_for(table.spec.provider))
    return evaluate(answers.golden, search, k)


@dataclass(frozen=True)
class Quality:
    """Each live version's scores, by state (active, candidate, previous)."""

    by_state: dict[str, tuple[int, Metrics]]
    missing: list[str]

    def metadata(self) -> dict[str, float | int]:
        figures: dict[str, float | int] = {}
        for state, (number, metrics) in self.by_state.items():
            figures[f"{state}_version"] = number
            figures.update(metrics.metadata(f"{state}_"))
        figures["golden_answers_missing"] = len(self.missing)
        return figures


def live_quality(conn: psycopg.Connection, declared: ResolvedTable) -> Quality | None:
    """Scores of every live version on the table's golden queries; None without golden queries."""
    answers = golden_answers(conn, declared)
    if answers is None:
        return None
    k = declared.spec.versions.golden_k
    return Quality({vt.version.state: (vt.version.version, version_quality(conn, vt, answers, k))
                    for vt in versions.live_tables(conn, declared)}, answers.describe())


def quality_gate(answers: AnswerCheck, k: int) -> Gate:
    """A gate that lets a candidate through when it is not worse than the active version by more
    than the declared `max_quality_drop` on recall@k and on MRR@10."""

    def gate(pair: ActiveAndCandidate) -> GateResult:
        active = version_quality(pair.conn, pair.active, answers, k)
        candidate = version_quality(pair.conn, pair.candidate, answers, k)
        return compare(active, candidate, pair.max_quality_drop)

    return gate


def gate_for(declared: ResolvedTable) -> Gate | None:
    """The table's promotion gate: its golden queries' quality gate, or None without any. The
    golden set is read when the gate is asked, not here: runs that find no candidate to promote
    (most of them) read nothing."""
    spec = declared.spec.versions
    if spec.golden is None and spec.golden_sql is None:
        return None

    def gate(pair: ActiveAndCandidate) -> GateResult:
        answers = golden_answers(pair.conn, declared)
        assert answers is not None  # golden or golden_sql is declared
        return quality_gate(answers, spec.golden_k)(pair)

    return gate
