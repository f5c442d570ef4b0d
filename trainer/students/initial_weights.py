"""A student's initial weights from a local file, read by `services.core.weights.read_state_dict`: safetensors
(recognised by its bytes) or a torch file read with `weights_only=True` (never unpickling arbitrary objects),
the state dict bare or nested the way training scripts save it.

Keys are the architecture's own: timm's published weights, and torchvision's for ResNets, whose key layout
timm's ResNet shares. A classifier trained for another number of classes (ImageNet's 1000, say) is left at
its fresh initialisation, and a log line says so; any other difference, and any file the reader refuses, is
a `ConfigError` naming the config field and the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from services.core.errors import ConfigError
from services.core.weights import WeightsFileError, read_state_dict

logger = logging.getLogger(__name__)

_KEYS_SHOWN = 8
_BN_COUNTER = "num_batches_tracked"


def classifier_name(model: nn.Module) -> str | None:
    """Module name of the model's classifier: timm's `get_classifier()`, else the last `nn.Linear`."""
    get_classifier = getattr(model, "get_classifier", None)  # timm's; nn.Module does not declare it
    head = get_classifier() if get_classifier is not None else None
    if head is None:
        linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
        head = linears[-1] if linears else None
    return next((name for name, module in model.named_modules() if module is head), None)


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(keys[:_KEYS_SHOWN]) + more


def _drop_classifier_of_other_classes(
    model: nn.Module, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str
) -> str | None:
    """Remove from `state` a classifier that differs from the model's in its class count only, saying so;
    return its module name (None when there is none to remove)."""
    head = classifier_name(model)
    weight = f"{head}.weight"
    if head is None or weight not in state or weight not in expected:
        return None
    got, want = state[weight].shape, expected[weight].shape
    if got == want or got[1:] != want[1:]:
        return None
    for key in [k for k in state if k.startswith(f"{head}.")]:
        del state[key]
    logger.info(
        "%s: classifier %r predicts %d classes, the student %d: re-initialised", source, head, got[0], want[0]
    )
    return head


def load_initial_weights(model: nn.Module, path: Path, *, field: str, architecture: str) -> None:
    """Copy the weights in `path` into `model` (see the module docstring for what fits)."""
    try:
        state = read_state_dict(path)
    except WeightsFileError as err:
        raise ConfigError(f"{field} {str(path)!r}: {err.problem}") from err
    expected = model.state_dict()
    fresh_head = _drop_classifier_of_other_classes(model, state, expected, f"{field} {path}")
    # BatchNorm step counters are left out of the comparison: published torchvision weights have none (BN
    # then fills in its own), and an extra one only ever accompanies a BN layer's other keys.
    missing = [
        k
        for k in expected
        if k not in state
        and not k.endswith(_BN_COUNTER)
        and not (fresh_head and k.startswith(f"{fresh_head}."))
    ]
    unexpected = [k for k in state if k not in expected and not k.endswith(_BN_COUNTER)]
    mismatched = [
        f"{k} (file {list(state[k].shape)}, student {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    findings = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
    problems = [f"{label}: {_listed(keys)}" for label, keys in findings if keys]
    if problems:
        raise ConfigError(
            f"{field} {str(path)!r} does not fit student {architecture!r}: {'; '.join(problems)}"
        )
    model.load_state_dict(state, strict=False)
