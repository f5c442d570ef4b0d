"""Distillation methods: one module per method, one registry (`METHODS`), one door (`create_method`).

Each method module defines a pydantic `...Params` model (its config section, discriminated by `name`) and
registers its builder with `@register_method`. Every module of this package is imported here, so that adding
a method is adding its module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from trainer.methods.registry import METHODS, MethodEntry, MethodParams, create_method, register_method

# Modules of this package that are not methods.
_SUPPORT_MODULES = frozenset({"base", "registry"})

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "MethodEntry", "MethodParams", "create_method", "register_method"]
