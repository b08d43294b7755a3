"""docs/configuration.md, written from the settings models: every field of the main file with its type,
default and description, so the reference cannot drift from what the gateway accepts.

    python -m proxy.process.config_doc            # rewrite docs/configuration.md
    python -m proxy.process.config_doc --check    # exit 1 if it is out of date (tests/test_config_doc.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from proxy.settings import GatewaySettings
from proxy.settings.traffic import LimitSettings

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

INTRODUCTION = """\
# Configuration reference

Every field of the gateway's main file (`--config`, default `conf/gateway.yaml`; a complete
production example is `conf/gateway.globus.yaml`). Generated from `proxy/settings/` by
`python -m proxy.process.config_doc`: do not edit by hand.

- Any string may name environment variables: `${{NAME}}` (required: start-up stops naming it when
  it is unset) or `${{NAME:-default}}`.
- Relative paths are relative to the main file, not to the working directory.
- Lists may also be written as one comma-separated string (the existing gateway's environment
  variables are).
- An unknown field, a wrong type or a value out of range stops start-up with the file and field
  named; `inference-gateway --config FILE --check-config` checks without starting.
- Rate limits are on by default: {rate:g} requests per second per user with bursts of {burst}, and
  {concurrent} requests or streams in flight per user (`limits`; 0 turns one off).

Endpoints and clusters are described in their own files (`endpoints_file`, `clusters_file`); see
[adaptors](adaptors.md).
"""


@dataclass(frozen=True)
class Row:
    name: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    name: str
    description: str
    rows: list[Row]


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds, optional or not, or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [model for arg in get_args(annotation) if (model := section_model(arg)) is not None]
        return models[0] if len(models) == 1 else None
    return None


def type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in get_args(annotation))
    if origin is Literal:
        return " or ".join(json.dumps(arg) for arg in get_args(annotation))
    if origin in (list, tuple):
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping of {type_name(key)} to {type_name(value)}"
    if annotation is type(None):
        return "null"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, Path):
        value = str(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def sections(model: type[BaseModel] = GatewaySettings, prefix: str = "") -> Iterator[Section]:
    """The model's own values first, then each nested section, depth first, in declaration order."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner = section_model(field.annotation)
        if inner is None and get_origin(field.annotation) is dict:
            entry = section_model(get_args(field.annotation)[1])
            if entry is not None:  # a mapping of named entries: one section for all of them
                rows.append(
                    Row(path, type_name(field.annotation), default_text(field), field.description or "")
                )
                nested.append((f"{path}.<name>", field, entry))
                continue
        if inner is None:
            rows.append(Row(path, type_name(field.annotation), default_text(field), field.description or ""))
        else:
            nested.append((path, field, inner))
    yield Section(prefix.rstrip(".") or "(top level)", (model.__doc__ or "").strip(), rows)
    for path, field, inner in nested:
        for section in sections(inner, f"{path}."):
            if section.name == path:
                notes = [field.description or "", "Required." if field.is_required() else ""]
                described = " ".join(text for text in (section.description, *notes) if text)
                yield Section(section.name, described, section.rows)
            else:
                yield section


def missing_descriptions(model: type[BaseModel] = GatewaySettings) -> list[str]:
    """Fields and sections an operator would find unexplained."""
    found = list(sections(model))
    missing = [section.name for section in found if not section.description]
    return missing + [row.name for section in found for row in section.rows if not row.description]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    limits = LimitSettings()
    parts = [
        INTRODUCTION.format(
            rate=limits.requests_per_second, burst=limits.burst, concurrent=limits.concurrent_per_user
        )
    ]
    for section in sections():
        parts.append(f"\n## `{section.name}`\n" if section.name != "(top level)" else "\n## Top level\n")
        parts.append(f"\n{section.description}\n")
        if not section.rows:
            continue
        parts.append("\n| Field | Type | Default | Description |\n|---|---|---|---|\n")
        for row in section.rows:
            parts.append(
                f"| `{row.name}` | {_cell(row.type)} | {_cell(row.default)} | {_cell(row.description)} |\n"
            )
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.process.config_doc", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the document is out of date")
    args = parser.parse_args(argv)
    missing = missing_descriptions()
    if missing:
        print(f"settings without a description: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = render()
    if args.check:
        current = DOCUMENT.read_text(encoding="utf-8") if DOCUMENT.exists() else ""
        if current != text:
            print(f"{DOCUMENT} is out of date: run python -m proxy.process.config_doc", file=sys.stderr)
            return 1
        return 0
    DOCUMENT.write_text(text, encoding="utf-8")
    print(f"wrote {DOCUMENT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
