"""Reading YAML config files into pydantic models, the same way for every config ekd has: YAML is data only
(safe_load, never code), `${VAR}` references expand from the environment, and every validation problem
becomes one line naming the field, what is wrong and the offending value — one error, no traceback."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from services.core.errors import ConfigError

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
    path: str | os.PathLike, model: type[Model], *, what: str, overrides: Sequence[str] = ()
) -> Model:
    """Read `path`, apply the "dotted.key=value" `overrides` (`apply_overrides`) and validate it as `model`;
    every problem raises one `ConfigError` naming the file and fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of {what} fields, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides, what=what)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        source = f"{path} with {', '.join(overrides)}" if overrides else str(path)
        raise ConfigError(f"{source}: invalid {what}\n{format_validation_error(err)}") from None


def apply_overrides(raw: dict, overrides: Sequence[str], *, what: str) -> dict:
    """`raw` with each "dotted.key=value" of `overrides` applied in order: the value is read as YAML (so
    `3`, `true`, `[1, 2]` and `null` keep their types), list items are addressed by index
    (`teachers.0.checkpoint=...`), and a missing intermediate mapping is created. The result is validated
    like the file, so a bad key or value names itself."""
    result = copy.deepcopy(raw)
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {override!r} of the {what}: use dotted.key=value, e.g. data.root=/data"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {override!r}: the value is not valid YAML: {err}") from None
        *parents, last = key.split(".")
        node = result
        for depth, part in enumerate(parents):
            node = _child(node, part, ".".join(parents[: depth + 1]), override)
        if isinstance(node, list):
            node[_index(node, last, key, override)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {override!r}: {'.'.join(parents)} is not a mapping or a list")
    return result


def _child(node, part: str, path: str, override: str):
    if isinstance(node, list):
        return node[_index(node, part, path, override)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {override!r}: {path} is inside a value that is not a mapping or a list")
    if not isinstance(node.get(part), dict | list):
        node[part] = {}
    return node[part]


def _index(node: list, part: str, path: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {override!r}: {path} needs a list index below {len(node)}")
    return int(part)
