"""ekd's digits and stratified split (trainer.data.digits, free of scikit-learn's import) are scikit-learn's:
the same arrays as `load_digits()`, and the same sets as a stratified `train_test_split` for every size,
fraction, class balance and seed tried, ties between classes' remainders included."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits as sklearn_load_digits
from sklearn.model_selection import train_test_split

from services.core.errors import ConfigError
from trainer.data.digits import load_digits, stratified_split


def test_the_digits_are_scikit_learns():
    ours, theirs = load_digits(), sklearn_load_digits()
    assert np.array_equal(ours.images, theirs.images) and ours.images.dtype == theirs.images.dtype
    assert np.array_equal(ours.target, theirs.target) and ours.target.dtype == theirs.target.dtype
    assert np.array_equal(ours.target_names, theirs.target_names)


def sklearn_split(labels: np.ndarray, held_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    kept, held = train_test_split(
        np.arange(len(labels)), test_size=held_fraction, stratify=labels, random_state=seed
    )
    return np.sort(kept), np.sort(held)


def label_sets() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        sklearn_load_digits().target,
        np.repeat(np.arange(10), 7),  # balanced: every class ties on its remainder
        np.repeat(np.arange(4), [2, 3, 5, 40]),  # unbalanced
        rng.integers(0, 7, size=301),
        rng.permutation(np.repeat(np.arange(3), [50, 50, 51])),
    ]


@pytest.mark.parametrize(
    "labels", label_sets(), ids=["digits", "balanced", "unbalanced", "random", "shuffled"]
)
@pytest.mark.parametrize("held_fraction", [0.1, 0.2, 0.25, 1 / 3, 0.5, 0.7])
def test_the_split_is_scikit_learns(labels, held_fraction):
    for seed in (0, 1, 7, 2**32 - 1):
        try:
            expected = sklearn_split(labels, held_fraction, seed)
        except ValueError:  # too few samples in a part for the classes: ekd refuses it too
            with pytest.raises(ConfigError):
                stratified_split(labels, held_fraction, seed)
            continue
        kept, held = stratified_split(labels, held_fraction, seed)
        assert np.array_equal(kept, expected[0]) and np.array_equal(held, expected[1])


def test_a_class_of_one_sample_cannot_be_split():
    with pytest.raises(ConfigError, match="class 3 has a single sample"):
        stratified_split(np.array([0, 0, 1, 1, 2, 2, 3]), 0.5, 0)


def test_loading_and_splitting_the_digits_does_not_import_scikit_learn():
    code = (
        "import sys\n"
        "from trainer.data import load_dataset\n"
        "load_dataset('digits', image_size=8, seed=0, val_fraction=0.1, train_fraction=0.5)\n"
        "print('sklearn' in sys.modules)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "False"
