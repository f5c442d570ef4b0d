"""Progress of long work (teacher training, student epochs), reported through a callback.

The core reports `ProgressUpdate`s and knows nothing of how they are shown: the CLI turns them into rich
progress bars, tests collect them, and a caller that passes no callback pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressUpdate:
    """Where one piece of work stands; updates with the same `task` belong to one progress bar."""

    task: str  # what progresses, e.g. "teacher cifar_resnet56" or an experiment's name
    completed: int  # units done (steps or epochs)
    total: int  # units in all
    description: str  # one line: the stage, the epoch, the latest validation accuracy


OnProgress = Callable[[ProgressUpdate], None]
