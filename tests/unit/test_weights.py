"""`services.core.weights`: the one reader of weights files, for teachers and students alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.core.errors import UserError
from services.core.weights import (
    NoStateDictError,
    PickledObjectError,
    WeightsFileError,
    WeightsFileNotFoundError,
    read_state_dict,
    read_weights_file,
)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "bn.running_mean": torch.randn(4, generator=generator),
        "fc.weight": torch.randn(2, 4, generator=generator),
    }


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def touch_marker(path: str) -> None:
    Path(path).touch()


class RunsCodeWhenUnpickled:
    """What a malicious checkpoint pickles: unpickling it calls `touch_marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return touch_marker, (str(self.marker),)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin", ""])
def test_safetensors_is_recognised_by_its_bytes_whatever_the_suffix(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    save_file(weights(), str(path))
    assert_same(read_state_dict(path), weights())


@pytest.mark.parametrize("key", ["state_dict_ema", "model_ema", "state_dict", "model"])
def test_a_state_dict_nested_by_a_training_script_is_found(tmp_path, key):
    path = tmp_path / "checkpoint.pth"
    torch.save({key: weights(), "epoch": 90, "optimizer": {"param_groups": []}}, path)
    assert_same(read_state_dict(path), weights())


def test_ema_weights_are_preferred_as_timm_does(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": weights(seed=0), "state_dict_ema": weights(seed=1)}, path)
    assert_same(read_state_dict(path), weights(seed=1))


def test_ddps_module_prefix_is_removed_from_every_key(tmp_path):
    path = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in weights().items()}}, path)
    assert_same(read_state_dict(path), weights())


def test_a_submodule_named_module_keeps_its_name(tmp_path):
    state = {**weights(), "module.weight": torch.ones(1)}
    path = tmp_path / "own.pt"
    torch.save(state, path)
    assert_same(read_state_dict(path), state)


def test_the_whole_content_is_there_for_formats_with_metadata(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save({"format": "some.format.v1", "num_classes": 2, "state_dict": weights()}, path)
    content = read_weights_file(path)
    assert (content["format"], content["num_classes"]) == ("some.format.v1", 2)
    assert_same(content["state_dict"], weights())


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "train-checkpoint.pth"
    torch.save({"state_dict": weights(), "args": RunsCodeWhenUnpickled(marker)}, path)

    with pytest.raises(PickledObjectError, match="pickles .*touch_marker.*weights_only=True") as info:
        read_state_dict(path)

    assert not marker.exists()
    assert info.value.global_name.endswith("touch_marker")
    torch.load(path, weights_only=False)  # the control: the file does run code when trusted
    assert marker.exists()


@pytest.mark.parametrize(
    "save, problem",
    [
        (lambda state, path: save_file(state, str(path)), "not a readable safetensors file"),
        (lambda state, path: torch.save(state, path), "not a readable torch checkpoint"),
    ],
    ids=["safetensors", "torch"],
)
def test_a_truncated_file_is_not_readable(tmp_path, save, problem):
    whole = tmp_path / "whole"
    save(weights(), whole)
    path = tmp_path / "truncated.pt"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    with pytest.raises(WeightsFileError, match=problem) as info:
        read_state_dict(path)

    assert info.value.problem.startswith(problem) and "\n" not in info.value.problem


@pytest.mark.parametrize(
    "content", [torch.zeros(3), [1, 2, 3], {}, {"weights": [1.0]}, {"model": {"fc.weight": 1.0}}]
)
def test_content_without_named_tensors_holds_no_state_dict(tmp_path, content):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(NoStateDictError, match="holds no state dict"):
        read_state_dict(path)


def test_errors_are_user_errors_naming_the_file_with_the_problem_apart(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsFileNotFoundError) as info:
        read_state_dict(path)
    assert isinstance(info.value, UserError)
    assert str(info.value) == f"weights file {str(path)!r}: no such file"
    assert (info.value.path, info.value.problem) == (str(path), "no such file")
