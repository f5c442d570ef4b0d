"""A sweep's outcome, in plain Python: one row per trial (its swept fields, accuracy, teacher calls, time,
error if it failed), as a table, a JSON record and a plot of accuracy against each swept field; and the record
of each trial as it ends, which a rerun of the sweep reads to skip what ended."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table

from services.core.errors import ConfigError

DONE, FAILED, STOPPED = "done", "failed", "stopped early"
INTERRUPTED = "interrupted"  # cut short by Ctrl-C: a rerun runs it again


@dataclass
class TrialOutcome:
    id: str
    experiment: str  # the experiment YAML
    fields: dict[str, Any]  # the swept fields' values
    status: str  # DONE, FAILED, STOPPED (by early stopping) or INTERRUPTED
    test_accuracy: float | None = None
    val_accuracy: float | None = None  # the last epoch's
    teacher_calls: float | None = None
    seconds: float | None = None
    epochs: int = 0  # epochs reported
    error: str | None = None  # FAILED: the error's last line
    results: str | None = None  # the trial's results JSON (`ExperimentResult`), DONE only

    def to_json(self) -> dict:
        return asdict(self)


def shown_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def sweep_table(outcomes: Sequence[TrialOutcome], fields: Sequence[str], title: str) -> Table:
    """Every trial: its fields, test and validation accuracy, teacher calls, time, and its status or error."""
    table = Table(title=title)
    several = len({o.experiment for o in outcomes}) > 1
    for column in ["trial", *(["experiment"] if several else []), *fields]:
        table.add_column(column, justify="left")
    for column in ("test acc.", "val acc.", "teacher calls", "time"):
        table.add_column(column, justify="right")
    table.add_column("status", justify="left")
    for o in outcomes:
        table.add_row(
            o.id,
            *([Path(o.experiment).stem] if several else []),
            *(shown_value(o.fields[f]) if f in o.fields else "—" for f in fields),
            _percent(o.test_accuracy),
            _percent(o.val_accuracy),
            "—" if o.teacher_calls is None else f"{o.teacher_calls:,.0f}",
            "—" if o.seconds is None else f"{o.seconds:.0f} s",
            o.status if o.error is None else f"{o.status}: {o.error}",
        )
    return table


def progress_line(outcome: TrialOutcome, finished: int, total: int) -> str:
    """What the driver says when a trial ends."""
    fields = ", ".join(f"{k}={shown_value(v)}" for k, v in outcome.fields.items())
    if outcome.status == FAILED:
        return f"[{finished}/{total}] {outcome.id} ({fields}) failed: {outcome.error}"
    figures = [f"test {_percent(outcome.test_accuracy)}"] if outcome.test_accuracy is not None else []
    if outcome.val_accuracy is not None:
        figures.append(f"val {_percent(outcome.val_accuracy)}")
    if outcome.teacher_calls is not None:
        figures.append(f"{outcome.teacher_calls:,.0f} teacher calls")
    if outcome.seconds is not None:
        figures.append(f"{outcome.seconds:.0f} s")
    return f"[{finished}/{total}] {outcome.id} ({fields}) {outcome.status}: " + ", ".join(figures)


def write_sweep_json(
    outcomes: Sequence[TrialOutcome], fields: Sequence[str], seconds: float, path: Path
) -> Path:
    record = {"fields": list(fields), "seconds": seconds, "trials": [o.to_json() for o in outcomes]}
    path.write_text(json.dumps(record, indent=1))
    return path


def save_ended_trial(outcome: TrialOutcome, folder: Path) -> None:
    """Record a trial that ended as `<folder>/<trial id>.json`, whole or not at all: written beside, then
    renamed over, so a driver killed mid-write leaves the previous record or none."""
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".{outcome.id}.json.partial"
    staged.write_text(json.dumps(outcome.to_json(), indent=1))
    os.replace(staged, folder / f"{outcome.id}.json")


def ended_trials(folder: Path) -> dict[str, TrialOutcome]:
    """The trials recorded in `folder` as ended, by id."""
    ended = {}
    for path in sorted(folder.glob("*.json")):
        try:
            outcome = TrialOutcome(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"sweep: {path} is not a record of an ended trial ({error}): remove it to run that trial "
                "again"
            ) from None
        ended[outcome.id] = outcome
    return ended


def read_sweep_json(path: Path) -> tuple[list[str], float, list[TrialOutcome]]:
    record = json.loads(path.read_text())
    return record["fields"], record["seconds"], [TrialOutcome(**t) for t in record["trials"]]


def _position(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """x positions of a field's values: the numbers themselves, else the values' ranks (with labels)."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = sorted({shown_value(v) for v in values})
    return [float(labels.index(shown_value(v))) for v in values], labels


def plot_sweep(outcomes: Sequence[TrialOutcome], fields: Sequence[str], path: Path) -> Path:
    """Test accuracy against each swept field: every finished trial a point, the mean per value a line."""
    done = [o for o in outcomes if o.test_accuracy is not None]
    shown_fields = list(fields) or ["trial"]
    fig, axes = plt.subplots(1, len(shown_fields), figsize=(4.5 * len(shown_fields), 4), squeeze=False)
    for ax, field in zip(axes[0], shown_fields):
        values = [o.fields.get(field, o.id) if field != "trial" else o.id for o in done]
        xs, labels = _position(values)
        ys = [100 * (o.test_accuracy or 0.0) for o in done]
        ax.scatter(xs, ys, alpha=0.6)
        by_x: dict[float, list[float]] = {}
        for x, y in zip(xs, ys):
            by_x.setdefault(x, []).append(y)
        if by_x:
            ordered = sorted(by_x)
            ax.plot(ordered, [statistics.fmean(by_x[x]) for x in ordered], color="black", linewidth=1)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(field)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{len(done)} of {len(outcomes)} trials finished; black: mean per value")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
