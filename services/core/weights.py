"""Reading a weights file: the one reader behind teachers' checkpoints and students' initial weights.

A file is safetensors when its bytes say so (whatever its name), and otherwise a torch file, read with
`weights_only=True` so that no file can run code: tensors and plain data load, a pickled object is refused
by name. The state dict is the file's content itself or, the way training scripts save it, nested under one
of `STATE_DICT_KEYS`; a "module." prefix on every key (DistributedDataParallel) is removed.

Errors are `WeightsFileError`s whose `problem` leaves the path out, so that a caller can name the file in
its own words (the teacher it was meant for, the config field that named it).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from services.core.errors import UserError

logger = logging.getLogger(__name__)

# Where training scripts nest the state dict, in timm's order of preference (EMA weights first).
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_DDP_PREFIX = "module."
# torch.load's weights_only refusal names the class it would have had to unpickle.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
# safetensors' layout: a little-endian u64 header length, then the header, a JSON object.
_SAFETENSORS_LENGTH_BYTES = 8


class WeightsFileError(UserError):
    """A file that cannot provide a state dict; `problem` says why without naming the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"weights file {str(path)!r}: {problem}")
        self.path = str(path)
        self.problem = problem


class WeightsFileNotFoundError(WeightsFileError):
    """No file at the path."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path, "no such file")


class PickledObjectError(WeightsFileError):
    """A torch file holding a pickled object, which `weights_only=True` refused to build."""

    def __init__(self, path: str | os.PathLike, global_name: str) -> None:
        super().__init__(
            path,
            f"pickles {global_name}, and ekd loads torch files only with weights_only=True (tensors and "
            "plain data): save the state dict alone, or as safetensors",
        )
        self.global_name = global_name


class NoStateDictError(WeightsFileError):
    """A readable file whose content holds no state dict of named tensors where one is looked for."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(
            path,
            "holds no state dict (named tensors, bare or under one of "
            f"{', '.join(repr(key) for key in STATE_DICT_KEYS)})",
        )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a safetensors or torch file (see the module docstring for the layouts)."""
    return find_state_dict(read_weights_file(path), path)


def read_weights_file(path: str | os.PathLike) -> Any:
    """A weights file's whole content: a safetensors file's tensors, or what a torch file holds in
    tensors and plain data (for formats that keep metadata beside the state dict)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileNotFoundError(path)
    if _is_safetensors(path):
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as err:  # any failure to parse untrusted bytes means "not a weights file"
            raise WeightsFileError(path, f"not a readable safetensors file ({_described(err)})") from err
    try:
        with warnings.catch_warnings():
            # torch warns of any pickle protocol but its own before it parses: the file is judged below.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to parse untrusted bytes means "not a weights file"
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise PickledObjectError(path, refused.group(1)) from err
        raise WeightsFileError(path, f"not a readable torch checkpoint ({_described(err)})") from err


def find_state_dict(content: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a file's `content`, bare or nested under `STATE_DICT_KEYS`, DDP's prefix removed;
    `path` is the file it came from, for the log line and the error."""
    if isinstance(content, dict):
        nested = next((key for key in STATE_DICT_KEYS if isinstance(content.get(key), dict)), None)
        if nested is not None:
            logger.info("%s: loading the weights under %r", path, nested)
            content = content[nested]
    if (
        not isinstance(content, dict)
        or not content
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items())
    ):
        raise NoStateDictError(path)
    # Only a prefix on every key is DDP's wrapper; on some keys it is a submodule's own name.
    if all(key.startswith(_DDP_PREFIX) for key in content):
        return {key.removeprefix(_DDP_PREFIX): tensor for key, tensor in content.items()}
    return content


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts the safetensors way: a header length that fits the file, then "{"."""
    with open(path, "rb") as handle:
        start = handle.read(_SAFETENSORS_LENGTH_BYTES + 1)
    if len(start) <= _SAFETENSORS_LENGTH_BYTES or start[_SAFETENSORS_LENGTH_BYTES:] != b"{":
        return False
    header_bytes = int.from_bytes(start[:_SAFETENSORS_LENGTH_BYTES], "little")
    return _SAFETENSORS_LENGTH_BYTES + header_bytes <= path.stat().st_size


def _described(err: BaseException) -> str:
    """The root error's type and first line: torch wraps a parse failure in paragraphs of advice (re-running
    with weights_only=False among them), and ekd prints errors as one line."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
