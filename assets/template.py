"""Templates: how a row becomes text. Free of Dagster.

A template renders exactly or is refused: a user template is parsed and checked on load (and its
columns against the catalog at install, catalog._check_template); the default template is built
from the column names, so it needs no parsing and any name works; a value that does not fit its
placeholder's format spec raises RenderError, and that row goes to the ledger, never stored as
something else.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

# One piece of a template: literal text, then a column (None at the end), its format spec and its
# conversion (s, r or a), as string.Formatter.parse gives them.
TemplatePart = tuple[str, str | None, str | None, str | None]

# Characters that end a placeholder's column name in a template: a column whose name holds one
# cannot be named in a template (it works in `columns`, whose default template needs no parsing).
TEMPLATE_SYNTAX = "{}:!"


def template_fields(template: str) -> list[str]:
    """The column names a template refers to, in order of first use."""
    seen: list[str] = []
    for _, field, _, _ in parse_template(template):
        if field is not None and field not in seen:
            seen.append(field)
    return seen


def parse_template(template: str) -> tuple[TemplatePart, ...]:
    """A user template's parts, refusing anything render would not fill exactly: an unbalanced
    brace, an empty placeholder, a nested placeholder in a format spec, an unknown conversion."""
    try:
        parts = tuple(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field == "":
            raise ValueError("template: empty {} placeholder; name a column")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"template: placeholder {{{field}}}: a nested {{...}} in a format spec is "
                             "not supported")
        if conversion not in (None, "s", "r", "a"):
            raise ValueError(f"template: placeholder {{{field}}}: unknown conversion !{conversion}; "
                             "use !s, !r or !a")
    return parts


def default_template_parts(columns: list[str]) -> tuple[TemplatePart, ...]:
    """The default template, one column after another with a blank line between, built from the
    names rather than parsed from text: any column name works, braces and colons included."""
    return tuple(("\n\n" if i else "", c, None, None) for i, c in enumerate(columns))


class RenderError(ValueError):
    """A row's value that its placeholder's format spec cannot format; names the column."""

    def __init__(self, column: str, message: str) -> None:
        self.column = column
        super().__init__(f"column {column!r}: {message}")


def render(parts: Sequence[TemplatePart], row: Mapping[str, Any]) -> str:
    """Fill a template (spec.template_parts) from a row. NULL becomes the empty string.

    Written out instead of `str.format` because format would let a template reach attributes
    (`{title.__class__}`) and would choke on column names containing `.` or `[`: a placeholder
    names a column by its whole text. Raises RenderError when a value does not fit its format spec.
    """
    out: list[str] = []
    for literal, column, spec, conversion in parts:
        out.append(literal)
        if column is None:
            continue
        value = row[column]
        if value is None:
            continue
        try:
            if conversion == "r":
                value = repr(value)
            elif conversion == "a":
                value = ascii(value)
            out.append(format(value, spec) if spec else str(value))
        except (ValueError, TypeError) as exc:
            raise RenderError(column, f"cannot format {type(value).__name__} value with "
                              f"{{{column}:{spec}}}: {exc}") from None
    return "".join(out)
