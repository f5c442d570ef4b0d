"""Results for people: one table (mean ± std over seeds) and one plot (accuracy against student parameters,
teachers marked), plus the JSON they are drawn from.

Every exported student has a row; one linked to a baseline (the same network trained alone with CE,
trainer.results.baselines) shows that baseline's accuracy and the gain over it, absolute (percentage points)
and relative (as BOC-KD reports its "+10.64 %"), when the baseline's results are among those given."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
from rich.table import Table

from trainer.runs.experiment import ExperimentResult


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.2%}" + (f" ± {std:.2%}" if len(values) > 1 else "")


def gain(accuracy: float, alone: float) -> tuple[float, float]:
    """(absolute gain in percentage points, relative gain in %) of `accuracy` over `alone` (fractions)."""
    return 100 * (accuracy - alone), 100 * (accuracy - alone) / alone if alone > 0 else float("nan")


def alone_accuracies(results: list[ExperimentResult], alone: str, seeds: list[int]) -> list[float]:
    """The test accuracies of baseline experiment `alone` for these seeds (those present among `results`)."""
    by_seed = {r.seed: r.test_accuracy for r in results if r.name == alone}
    return [by_seed[seed] for seed in seeds if seed in by_seed]


def group_by_experiment(results: list[ExperimentResult]) -> dict[str, list[ExperimentResult]]:
    groups: dict[str, list[ExperimentResult]] = defaultdict(list)
    for r in results:
        groups[r.name].append(r)
    return dict(groups)


def results_table(results: list[ExperimentResult], title: str = "ekd results") -> Table:
    table = Table(title=title)
    for column in (
        "experiment",
        "method",
        "seeds",
        "student params",
        "teacher params",
        "test accuracy",
        "alone (CE)",
        "gain",
        "teacher calls",
        "time (s)",
    ):
        table.add_column(
            column,
            justify="left" if column in ("experiment", "method") else "right",
            no_wrap=column in ("experiment", "gain"),  # names and gains stay whole (and searchable)
        )
    for name, runs in group_by_experiment(results).items():
        first = runs[0]
        calls = [r.counters.get("teacher_calls", 0) for r in runs]
        teacher_params = sum(t.params for t in first.teachers)
        table.add_row(
            name,
            first.method,
            str(len(runs)),
            f"{first.student_params:,}",
            f"{teacher_params:,}" if teacher_params else "—",
            _pct([r.test_accuracy for r in runs]),
            "",
            "",
            str(sum(calls)),
            f"{statistics.fmean(r.seconds for r in runs):.0f}",
        )
        for i, student in enumerate(first.students):
            accs = [r.students[i].test_accuracy for r in runs]
            alone = alone_accuracies(results, student.alone, [r.seed for r in runs]) if student.alone else []
            alone_cell = gain_cell = ""
            if alone:
                absolute, relative = gain(statistics.fmean(accs), statistics.fmean(alone))
                alone_cell, gain_cell = _pct(alone), f"{absolute:+.2f} pp ({relative:+.1f} %)"
            headline = " (headline)" if student.name == first.headline else ""
            table.add_row(
                f"  └ {student.name}{headline}",
                "",
                "",
                f"{student.params:,}",
                "",
                _pct(accs),
                alone_cell,
                gain_cell,
                "",
                "",
            )
    return table


def _teacher_points(results: list[ExperimentResult]) -> dict[str, tuple[int, list[float]]]:
    points: dict[str, tuple[int, list[float]]] = {}
    for r in results:
        for t in r.teachers:
            points.setdefault(t.name, (t.params, []))[1].append(t.test_accuracy)
    return points


def teacher_table(results: list[ExperimentResult]) -> Table | None:
    points = _teacher_points(results)
    if not points:
        return None
    table = Table(title="teachers")
    for column in ("teacher", "params", "test accuracy", "trained on"):
        table.add_column(column, justify="right" if column in ("params", "test accuracy") else "left")
    for name, (params, accs) in points.items():
        table.add_row(name, f"{params:,}", _pct(accs), _training_data(results, name))
    return table


def _training_data(results: list[ExperimentResult], teacher: str) -> str:
    recorded = next(t.training_data for r in results for t in r.teachers if t.name == teacher)
    if recorded is None:
        return "not recorded in its checkpoint"
    return (
        f"{recorded['dataset']}, train_fraction {recorded['train_fraction']:g} "
        f"(split_seed {recorded['split_seed']}, val_fraction {recorded['val_fraction']:g})"
    )


def plot_results(results: list[ExperimentResult], path: Path) -> Path:
    """Accuracy against deployed student parameters (log scale); teachers as stars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in group_by_experiment(results).items():
        mean, std = _mean_std([r.test_accuracy for r in runs])
        ax.errorbar(runs[0].student_params, mean * 100, yerr=std * 100, fmt="o", capsize=3, label=name)
    for teacher, (params, accs) in _teacher_points(results).items():
        ax.scatter(params, statistics.fmean(accs) * 100, marker="*", s=180, color="black", zorder=3)
        ax.annotate(
            teacher,
            (params, statistics.fmean(accs) * 100),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters used at prediction (log scale); ★ = teacher")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results_json(results: list[ExperimentResult], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_json() for r in results], indent=2))
    return path
