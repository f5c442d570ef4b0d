"""scikit-learn's digits and its seeded stratified split, without importing scikit-learn.

`import sklearn` takes about 1.5 s (it imports pandas and scipy.stats), a fifth of an `ekd distill`'s start,
and every process that carves a dataset would pay it: each `ekd` command, each Ray Train worker, each sweep
trial. So this module reads the digits file that scikit-learn ships, as `sklearn.datasets.load_digits` does,
and splits the way `sklearn.model_selection.train_test_split(..., stratify=labels, random_state=seed)` does,
draw for draw (its `StratifiedShuffleSplit`), so that every split, and every figure trained on one, is the
one scikit-learn makes. tests/unit/test_digits.py holds both to scikit-learn's own functions.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.core.errors import ConfigError

# Where scikit-learn's wheel keeps the digits (load_digits reads the same file).
_DIGITS_FILE = ("datasets", "data", "digits.csv.gz")
_DIGITS_SIDE = 8


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # float64 [1797, 8, 8], counts 0..16 as load_digits gives them
    target: np.ndarray  # int64 [1797]
    target_names: np.ndarray  # 0..9


def load_digits() -> Digits:
    """`sklearn.datasets.load_digits()`'s images, targets and class names, read from its file."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ConfigError("the digits dataset comes with scikit-learn, which is not installed")
    path = Path(spec.origin).parent.joinpath(*_DIGITS_FILE)
    with gzip.open(path, "rt") as file:
        data = np.loadtxt(file, delimiter=",")
    target = data[:, -1].astype(int)
    images = data[:, :-1].reshape(-1, _DIGITS_SIDE, _DIGITS_SIDE)
    return Digits(images=images, target=target, target_names=np.arange(10))


def stratified_split(labels: np.ndarray, held_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) sorted positions into `labels`: the sets `train_test_split(range(len(labels)),
    test_size=held_fraction, stratify=labels, random_state=seed)` returns."""
    samples = len(labels)
    held_count = math.ceil(held_fraction * samples)
    kept_count = samples - held_count
    classes, class_of, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        single = classes[class_counts.argmin()].item()
        raise ConfigError(f"class {single!r} has a single sample: a stratified split needs two")
    if min(kept_count, held_count) < len(classes):
        raise ConfigError(
            f"splitting {samples} samples {kept_count}/{held_count} leaves a part with fewer samples than "
            f"the {len(classes)} classes"
        )
    members = np.split(np.argsort(class_of, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    kept_per_class = _approximate_mode(class_counts, kept_count, rng)
    held_per_class = _approximate_mode(class_counts - kept_per_class, held_count, rng)
    kept: list[int] = []
    held: list[int] = []
    for positions, kept_here, held_here in zip(members, kept_per_class, held_per_class, strict=True):
        shuffled = positions.take(rng.permutation(len(positions)), mode="clip")
        kept.extend(shuffled[:kept_here])
        held.extend(shuffled[kept_here : kept_here + held_here])
    return np.sort(np.asarray(kept, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def _approximate_mode(class_counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Samples per class of `draws` drawn stratified: the floor of each class's share, then one more for the
    largest remainders, ties broken by `rng` (scikit-learn's `_approximate_mode`)."""
    continuous = class_counts / class_counts.sum() * draws
    floored = np.floor(continuous)
    missing = int(draws - floored.sum())
    if missing > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            now = min(len(tied), missing)
            floored[rng.choice(tied, size=now, replace=False)] += 1
            missing -= now
            if missing == 0:
                break
    return floored.astype(int)
