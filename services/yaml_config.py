"""Reading YAML config files into pydantic models, the same way for every config ekd has: YAML is data only
(safe_load, never code), `${VAR}` references expand from the environment, and every validation problem
becomes one line naming the field, what is wrong and the offending value — one error, no traceback."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
Model = TypeVar("Model", bound=BaseModel)


def expand_environment(value: str) -> str:
    """Replace every ${VAR} with its value; an unset variable is an error, not an empty string."""
    missing = [name for name in _ENV_REFERENCE.findall(value) if name not in os.environ]
    if missing:
        raise ValueError(f"{value!r} refers to unset environment variables: {', '.join(missing)}")
    return _ENV_REFERENCE.sub(lambda match: os.environ[match.group(1)], value)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: the field's dotted location, what is wrong, and the offending value."""
    lines = []
    for error in err.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        value = error.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {where}: {error['msg']}{shown}")
    return "\n".join(lines)


def load_yaml_model(
    path: str | os.PathLike, model: type[Model], *, what: str, error: type[ValueError]
) -> Model:
    """Read `path` and validate it as `model`; every problem raises one `error` naming the file and fields."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise error(f"{path} must hold a mapping of {what} fields, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise error(f"{path}: invalid {what}\n{format_validation_error(err)}") from None
