"""Reading the table declarations from disk, without Dagster.

A table is declared as a Dagster Component: a `defs.yaml` in a folder of its own under the
declarations folder (by default orchestration/defs, the project's dg defs folder), whose `type`
is the EmbeddingTable component and whose `attributes` are the fields of `TableSpec`:

    type: orchestration.components.EmbeddingTable
    attributes:
      name: articles
      source: public.articles
      columns: [title, body]

One `defs.yaml` may hold several tables as YAML documents separated by `---`, as dg allows;
documents of other component types are someone else's and are left alone. The older format (a
`*.yaml` file directly in the folder whose fields are the table's) is still read, so existing
declarations keep working until they are moved (docs/declaring-a-table.md says how).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .spec import SpecError, TableSpec, parse_spec

COMPONENT_TYPE = "orchestration.components.EmbeddingTable"
# dg also resolves a type by its class name within a registered module's namespace.
COMPONENT_TYPE_NAMES = {COMPONENT_TYPE, "EmbeddingTable"}


def _documents(path: Path) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(str(path), "", f"not valid YAML: {exc}") from None


def declarations_in_file(path: Path) -> list[tuple[TableSpec, str]]:
    """The tables a `defs.yaml` (component format) or a legacy `*.yaml` declares."""
    found: list[tuple[TableSpec, str]] = []
    for doc in _documents(path):
        if path.name == "defs.yaml":
            if not isinstance(doc, dict) or "type" not in doc:
                raise SpecError(str(path), "type", "a component file needs `type:` and `attributes:`")
            if doc["type"] not in COMPONENT_TYPE_NAMES:
                continue  # another component type in the same defs folder
            extra = sorted(set(doc) - {"type", "attributes", "requirements", "post_processing", "template_vars_module"})
            if extra:
                raise SpecError(str(path), extra[0], "unknown key; the table's fields go under `attributes:`")
            found.append((parse_spec(doc.get("attributes"), str(path)), str(path)))
        else:
            found.append((parse_spec(doc, str(path)), str(path)))
    return found


def declaration_files(directory: Path) -> list[Path]:
    """Every file that may declare a table: `defs.yaml` at any depth, and legacy `*.yaml` files
    directly in the folder."""
    if not directory.is_dir():
        raise SpecError(str(directory), "", "the table declarations directory does not exist")
    legacy = [p for p in directory.glob("*.y*ml") if p.name not in ("defs.yaml", "defs.yml")]
    return sorted({*directory.rglob("defs.yaml"), *legacy})


def load_declarations_isolated(directory: Path) -> tuple[list[tuple[TableSpec, str]], list[SpecError]]:
    """Like load_declarations, but a file that cannot be read is reported beside the tables of
    the others instead of stopping them: one bad declaration must not take every table down."""
    specs: list[tuple[TableSpec, str]] = []
    errors: list[SpecError] = []
    seen: dict[str, str] = {}
    for path in declaration_files(directory):
        try:
            declared = declarations_in_file(path)
        except SpecError as exc:
            errors.append(exc)
            continue
        for spec, origin in declared:
            if spec.name in seen:
                errors.append(SpecError(origin, "name", f"{spec.name!r} is already declared in {seen[spec.name]}"))
                continue
            seen[spec.name] = origin
            specs.append((spec, origin))
    return specs, errors


def load_declarations(directory: Path) -> list[tuple[TableSpec, str]]:
    """Every table declared under `directory`, with the file it came from; the first declaration
    error is raised (file: field: message). Table names are unique across files."""
    specs, errors = load_declarations_isolated(directory)
    if errors:
        raise errors[0]
    return specs
