"""Read a spec file and turn pydantic's errors into messages a user can act on.

Every error names the field path, the bad value and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pgbridge.errors import SpecError
from pgbridge.spec.models import Spec


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class found by walking `path` from Spec (for listing allowed field names)."""
    model: Any = Spec
    for part in path:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part) or next((f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid spec ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = ", ".join(_field_names(parent)) if parent else "see `pgbridge schema`"
            lines.append(f"  - {path}: unknown field; allowed here: {allowed}")
            continue
        if e["type"] == "missing":
            lines.append(f"  - {path}: required field is missing")
            continue
        bad = e.get("input")
        shown = json.dumps(bad, default=str) if not isinstance(bad, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  - {path}: {shown} is not allowed: {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "spec") -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping (got {type(data).__name__})")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_errors(e, source), hint="`pgbridge schema` prints every field") from None


def load_spec(path: Path) -> Spec:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist", hint="`pgbridge init` writes an example") from None
    except OSError as e:
        raise SpecError(f"cannot read spec file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_spec(data, str(path))


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema(by_alias=True)
