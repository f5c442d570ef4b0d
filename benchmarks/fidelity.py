"""The fidelity report: every method on digits at training fractions 5 %, 10 %, 25 % and 100 %, on two draws
of the limited-data subset × 3 seeds, beside the baselines the papers' claims are made against, as one table
and one plot.

The runs are one `ekd sweep` (configs/digits/sweep_fidelity.yaml): each method from its digits config
(configs/digits/*.yaml, hyperparameters as there and in docs/methods.md, nothing tuned here) with
`data.val_fraction: 0` (the whole training split trains, as in the papers), `data.train_fraction` and
`data.subset_seed` swept, and `train.steps` fixed: the same number of optimizer steps at every fraction (138 =
6 epochs of the full split, 69 epochs of the 5 % subset; FEED sequential gets half per stage). The teachers of
each fraction and subset train on it (their own checkpoints under runs/fidelity/teachers/, trained when
missing, 276 steps, seed 0) and are the same for every seed. Each trial then trains the networks its method
exports alone with CE on the same data, schedule and seed (trainer.results.baselines:
`<experiment>-alone-<network>`). A cell's mean ± std pools the seeds and the subset draws, so its error bar
covers which images were drawn as well as the seed.

Writes, under --output (default runs/fidelity, the sweep's folder): `fidelity.md` (the table: test accuracy,
mean ± std per method row and fraction column; baselines and gains beside the rows they belong to),
`fidelity.png` (accuracy against fraction, one line per method, baselines dashed), `results.json` (every
run's record), and the sweep's own table, plot and trials (`trials/<experiment>-tNNN/`, exports loadable by
`ekd evaluate`).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity.py [--seeds 0,1,2] [--fractions 0.05,0.1,0.25,1]
                                                               [--subset-seeds 0,1] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console

from trainer.runs.experiment import ExperimentResult
from trainer.sweep.plan import RESULTS_FILE
from trainer.sweep.report import DONE, read_sweep_json

SWEEP = Path("configs/digits/sweep_fidelity.yaml")
EKD = str(Path(sys.executable).parent / "ekd")

console = Console(stderr=True)


def sweep_results(sweep_dir: Path) -> list[ExperimentResult]:
    """Every finished trial's record and its baselines' under the experiment names the table knows (the
    trial's name less its `-tNNN`)."""
    _, _, outcomes = read_sweep_json(sweep_dir / RESULTS_FILE)
    results = []
    for outcome in outcomes:
        if outcome.status != DONE or outcome.results is None:
            continue
        trial = ExperimentResult.from_json(json.loads(Path(outcome.results).read_text()))
        base = trial.name.removesuffix(f"-{outcome.id}")
        for student in trial.students:
            if student.alone is None:
                continue
            alone = Path(trial.run_dir).parent / student.alone / f"results_seed{trial.seed}.json"
            student.alone = base + student.alone.removeprefix(trial.name)
            if alone.is_file():
                baseline = ExperimentResult.from_json(json.loads(alone.read_text()))
                baseline.name = student.alone
                results.append(baseline)
        trial.name = base
        results.append(trial)
    return results


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # "teacher", "method" (a headline), "part" (another export of a method) or "baseline"
    experiment: str
    part: str | None = None  # an exported student; None: the experiment's headline; "teacher<i>": teacher i
    alone: bool = False  # the baseline linked from `part` instead of `part` itself


ROWS = (
    Row("teacher cifar_resnet56", "teacher", "digits-kd-ensemble", "teacher0"),
    Row("teacher cifar_wrn16_4", "teacher", "digits-kd-ensemble", "teacher1"),
    Row("CE: cifar_resnet8 alone", "baseline", "digits-ce"),
    Row("KD, 1 teacher → cifar_resnet8", "method", "digits-kd"),
    Row("KD, 2-teacher ensemble → cifar_resnet8", "method", "digits-kd-ensemble"),
    Row("FEED parallel → cifar_resnet8", "method", "digits-feed-parallel"),
    Row("FEED sequential → cifar_resnet8", "method", "digits-feed-sequential"),
    Row("EKD: branch ensemble", "method", "digits-ekd"),
    Row("EKD: branch 0 (cifar_resnet56's)", "part", "digits-ekd", "branch_0"),
    Row("EKD: branch 1 (cifar_wrn16_4's)", "part", "digits-ekd", "branch_1"),
    Row("ONE: branch 0", "method", "digits-one"),
    Row("ONE-E: gated ensemble", "part", "digits-one", "one_ensemble"),
    Row("ONE's branch network alone (CE, ONE's schedule)", "baseline", "digits-one", "branch_0", alone=True),
    Row("OKD: mean of the 5 students", "method", "digits-okd"),
    *(
        row
        for width in ("1.0", "0.8", "0.6", "0.4", "0.2")
        for row in (
            Row(f"OKD student w{width}", "part", "digits-okd", f"student_w{width}"),
            Row(f"w{width} alone (CE, OKD's schedule)", "baseline", "digits-okd", f"student_w{width}", True),
        )
    ),
    Row("OKD, official code's recipe: mean of the 5 students", "method", "digits-okd-official-code"),
    Row("OKD, official code's recipe: student w1.0", "part", "digits-okd-official-code", "student_w1.0"),
    Row("OKD, official code's recipe: student w0.2", "part", "digits-okd-official-code", "student_w0.2"),
    Row("student ensemble: vote", "method", "digits-student-ensemble"),
    *(
        row
        for index in range(3)
        for row in (
            Row(f"student ensemble member {index}", "part", "digits-student-ensemble", f"student_{index}"),
            Row(
                f"member {index} alone (CE)", "baseline", "digits-student-ensemble", f"student_{index}", True
            ),
        )
    ),
)


def accuracies(results: list[ExperimentResult], fraction: float, row: Row) -> list[float]:
    """The row's test accuracy per seed at one fraction."""
    at = [r for r in results if r.config["data"]["train_fraction"] == fraction]
    runs = [r for r in at if r.name == row.experiment]
    if row.part is None:
        return [r.test_accuracy for r in runs]
    if row.part.startswith("teacher"):
        return [r.teachers[int(row.part.removeprefix("teacher"))].test_accuracy for r in runs]
    students = [s for r in runs for s in r.students if s.name == row.part]
    if not row.alone:
        return [s.test_accuracy for s in students]
    links = {s.alone for s in students}
    return [r.test_accuracy for r in at if r.name in links]


def _mean(results: list[ExperimentResult], fraction: float, label: str) -> float:
    row = next(row for row in ROWS if row.label == label)
    return 100 * statistics.fmean(accuracies(results, fraction, row))


# The papers' claims, each as (claim, relation, [(better row, worse row), ...]): it holds at a fraction when
# every `better` row's mean beats its `worse` row's (a tie counts for "≥"); cells show the smallest margin.
CLAIMS = (
    ("KD > CE (1 teacher)", ">", [("KD, 1 teacher → cifar_resnet8", "CE: cifar_resnet8 alone")]),
    ("KD > CE (2 teachers)", ">", [("KD, 2-teacher ensemble → cifar_resnet8", "CE: cifar_resnet8 alone")]),
    (
        "ensemble teacher ≥ single teacher (KD students)",
        "≥",
        [("KD, 2-teacher ensemble → cifar_resnet8", "KD, 1 teacher → cifar_resnet8")],
    ),
    (
        "EKD's branch ensemble > each of its branches",
        ">",
        [
            ("EKD: branch ensemble", "EKD: branch 0 (cifar_resnet56's)"),
            ("EKD: branch ensemble", "EKD: branch 1 (cifar_wrn16_4's)"),
        ],
    ),
    (
        "EKD's branch ensemble > single-teacher KD",
        ">",
        [("EKD: branch ensemble", "KD, 1 teacher → cifar_resnet8")],
    ),
    (
        "ONE's branch > the same network alone",
        ">",
        [("ONE: branch 0", "ONE's branch network alone (CE, ONE's schedule)")],
    ),
    ("ONE-E > its branch", ">", [("ONE-E: gated ensemble", "ONE: branch 0")]),
    *(
        (f"OKD student w{w} > w{w} alone", ">", [(f"OKD student w{w}", f"w{w} alone (CE, OKD's schedule)")])
        for w in ("1.0", "0.8", "0.6", "0.4", "0.2")
    ),
    (
        "student ensemble's vote > each member",
        ">",
        [("student ensemble: vote", f"student ensemble member {i}") for i in range(3)],
    ),
    (
        "FEED parallel ≥ KD (same 2 teachers)",
        "≥",
        [("FEED parallel → cifar_resnet8", "KD, 2-teacher ensemble → cifar_resnet8")],
    ),
    (
        "FEED sequential ≥ KD (same 2 teachers)",
        "≥",
        [("FEED sequential → cifar_resnet8", "KD, 2-teacher ensemble → cifar_resnet8")],
    ),
)


def claim_lines(results: list[ExperimentResult], fractions: list[float]) -> list[str]:
    """The claims table (holds / fails per fraction, with the smallest margin in points), and OKD's
    smallest-gains-most claim, from the means over seeds."""
    lines = [
        "| claim | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for claim, relation, pairs in CLAIMS:
        cells = []
        for fraction in fractions:
            margin = min(_mean(results, fraction, a) - _mean(results, fraction, b) for a, b in pairs)
            holds = margin > 0 or (relation == "≥" and margin == 0)
            cells.append(f"{'holds' if holds else 'fails'} ({margin:+.1f})")
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    cells = []
    for fraction in fractions:
        gains = {
            w: _mean(results, fraction, f"OKD student w{w}")
            - _mean(results, fraction, f"w{w} alone (CE, OKD's schedule)")
            for w in ("1.0", "0.8", "0.6", "0.4", "0.2")
        }
        largest = max(gains, key=gains.get)
        cells.append(
            f"{'holds' if largest == '0.2' else 'fails'} (largest: w{largest}, {gains[largest]:+.1f})"
        )
    lines.append("| OKD: the smallest student gains most | " + " | ".join(cells) + " |")
    return lines


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def write_table(results: list[ExperimentResult], fractions: list[float], path: Path, seconds: float) -> str:
    header = "| network | " + " | ".join(f"{f:.0%} of train" for f in fractions) + " |"
    lines = [header, "|---|" + "---:|" * len(fractions)]
    for row in ROWS:
        label = row.label if row.kind != "baseline" else f"*{row.label}*"
        cells = [_cell(accuracies(results, f, row)) for f in fractions]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sizes = {r.config["data"]["train_fraction"]: r.train_samples for r in results}
    steps = {r.config["data"]["train_fraction"]: r.optimizer_steps for r in results if r.name == "digits-ce"}
    lines += [
        "",
        "Training images per fraction: "
        + ", ".join(f"{f:.0%}: {sizes[f]}" for f in fractions)
        + "; optimizer "
        "steps per run: "
        + ", ".join(f"{f:.0%}: {steps[f]}" for f in fractions)
        + ". Test split: 360 images. "
        f"Seeds per cell: {len({r.seed for r in results})}, on "
        f"{len({r.config['data'].get('subset_seed') for r in results})} draws of each subset. "
        f"Wall time: {seconds / 60:.0f} min.",
    ]
    lines += ["", "Claims (means over seeds; in brackets the smallest margin, in points):", ""]
    lines += claim_lines(results, fractions)
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(results: list[ExperimentResult], fractions: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(11, 7))
    # 40 distinct colours, one per line (matplotlib's default cycle repeats after 10).
    colours = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
    for row, colour in zip((row for row in ROWS if row.kind != "teacher"), colours):
        means = [100 * statistics.fmean(v) if (v := accuracies(results, f, row)) else None for f in fractions]
        ax.plot(
            [100 * f for f in fractions],
            means,
            linestyle="--" if row.kind == "baseline" else "-",
            marker="o" if row.kind == "method" else ".",
            linewidth=1.8 if row.kind == "method" else 1.0,
            color=colour,
            label=row.label,
        )
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in fractions], [f"{f:.0%}" for f in fractions])
    ax.set_xlabel("share of the digits training split trained on (log scale)")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title("digits: methods (solid) and the same networks trained alone with CE (dashed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.05,0.1,0.25,1")
    parser.add_argument("--subset-seeds", default="0,1", help="draws of each limited-data subset")
    parser.add_argument("--jobs", type=int, default=2, help="trials at once")
    parser.add_argument("--output", default="runs/fidelity", help="the sweep's folder")
    parser.add_argument(
        "--from-results",
        type=Path,
        help="rewrite the table and plot from a results.json this script wrote, training nothing",
    )
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.from_results is not None:
        saved = json.loads(args.from_results.read_text())
        if isinstance(saved, list):  # written before results.json kept the wall time
            saved = {"seconds": float("nan"), "runs": saved}
        results = [ExperimentResult.from_json(r) for r in saved["runs"]]
        print(write_table(results, fractions, output / "fidelity.md", saved["seconds"]))
        plot(results, fractions, output / "fidelity.png")
        return
    started = time.time()
    command = [
        EKD,
        "sweep",
        str(SWEEP),
        "--name",
        output.name,
        "--output-dir",
        str(output.parent),
        "--seeds",
        args.seeds,
        "--grid",
        f"data.train_fraction={','.join(str(f) for f in fractions)}",
        "--grid",
        f"data.subset_seed={args.subset_seeds}",
        "--concurrent",
        str(args.jobs),
    ]
    subprocess.run(command, check=True)  # a rerun resumes the sweep
    seconds = time.time() - started
    results = sweep_results(output)
    records = [r.to_json() for r in results]
    (output / "results.json").write_text(json.dumps({"seconds": seconds, "runs": records}, indent=1))
    table = write_table(results, fractions, output / "fidelity.md", seconds)
    plot(results, fractions, output / "fidelity.png")
    print(table)
    console.print(f"table: {output / 'fidelity.md'}\nplot: {output / 'fidelity.png'}")


if __name__ == "__main__":
    main()
