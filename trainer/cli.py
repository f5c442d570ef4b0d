"""`ekd`: the command line (Typer + rich). Progress and logs go to stderr, tables to stdout.

Errors a user can fix (`services.errors.UserError`: a bad config, a missing dataset or checkpoint, a service
or cache that cannot be reached) print one short message and exit with status 2, without a traceback
(`--debug` shows it). Anything else is a bug: it exits with status 1 and its traceback.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from services.errors import ConfigError, UserError
from services.yaml_config import format_validation_error
from trainer.config import ExperimentConfig, load_experiment
from trainer.progress import ProgressUpdate

app = typer.Typer(
    name="ekd",
    help="Ensemble knowledge distillation: served teachers, cached outputs, compact students.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
teachers_app = typer.Typer(help="Train the teachers ekd distills from.", no_args_is_help=True)
app.add_typer(teachers_app, name="teachers")

err_console = Console(stderr=True)
# Tables stay readable when stdout is a pipe or a file (rich would otherwise squeeze them to 80 columns).
out_console = Console(width=None if Console().is_terminal else 140)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="override a config field, dotted.key=value (value read as YAML), e.g. --set data.root=/data "
        "--set teachers.0.checkpoint=/ckpt/senet154.safetensors; repeatable, validated like the file",
        show_default=False,
    ),
]
ConfigArg = Annotated[
    Path, typer.Argument(help="experiment YAML, e.g. configs/digits/kd.yaml", show_default=False)
]


# The packages whose loggers `-v` turns up; third-party loggers stay at WARNING.
EKD_LOGGERS = ("services", "trainer")
_show_user_error_tracebacks = False  # set by --debug


def version_callback(show: bool) -> None:
    if show:
        out_console.print(f"ekd {importlib.metadata.version('ekd')}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="more log lines: -v for debug messages")
    ] = 0,
    debug: Annotated[bool, typer.Option(help="show the traceback of user errors too")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version")
    ] = False,
) -> None:
    global _show_user_error_tracebacks
    _show_user_error_tracebacks = debug
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    for name in EKD_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def user_errors(fn):
    """Turn the errors a user can fix into one line on stderr and exit status 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if _show_user_error_tracebacks:
                err_console.print_exception()
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


class ProgressBars:
    """Rich progress bars on stderr fed by the core's `ProgressUpdate`s: one bar per task."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, update: ProgressUpdate) -> None:
        if update.task not in self._tasks:
            self._tasks[update.task] = self.progress.add_task(update.description, total=update.total)
        self.progress.update(
            self._tasks[update.task],
            completed=update.completed,
            total=update.total,
            description=update.description,
        )

    def __enter__(self) -> ProgressBars:
        self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()


def parse_seeds(seeds: str | None, default: int) -> list[int]:
    if seeds is None:
        return [default]
    try:
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"comma-separated integers like 0,1,2, got {seeds!r}", param_hint="--seeds"
        ) from None
    if not values or any(v < 0 for v in values):
        raise typer.BadParameter(f"non-negative integers like 0,1,2, got {seeds!r}", param_hint="--seeds")
    return values


def with_cli_overrides(
    cfg: ExperimentConfig, *, output_dir: Path | None, teacher_service: str | None, ray_address: str | None
) -> ExperimentConfig:
    """The experiment with what the command line says instead of the file, validated again."""
    data = cfg.model_dump()
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    if teacher_service is not None:
        source = data["teacher_source"]
        source.update(
            kind="served", address=teacher_service, cache=source["cache"] or os.environ.get("EKD_CACHE_URI")
        )
    if ray_address is not None:
        data["execution"]["backend"] = "ray_train"
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid command-line override\n{format_validation_error(err)}") from None


@teachers_app.command("train")
@user_errors
def teachers_train(
    config: ConfigArg,
    force: Annotated[bool, typer.Option(help="retrain even when a checkpoint exists")] = False,
    overrides: SetOption = None,
) -> None:
    """Train the teachers an experiment names and save their local checkpoints."""
    from trainer.experiment import ensure_teachers
    from trainer.inputs import load_splits
    from trainer.loop import resolve_device

    cfg = load_experiment(config, overrides or ())
    if not cfg.teachers:
        raise ConfigError(f"{config} names no teachers (method {cfg.method.name!r} uses none)")
    splits = load_splits(cfg)
    with ProgressBars() as bars:
        ensure_teachers(cfg, splits, resolve_device(cfg.device), bars, force=force)
    for t in cfg.teachers:
        out_console.print(f"{t.name}: {t.checkpoint}")


@app.command()
@user_errors
def distill(
    config: ConfigArg,
    seeds: Annotated[
        str | None, typer.Option(help="comma-separated seeds, e.g. 0,1,2 (default: the config's)")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option(help="where results go (default: the config's)")] = None,
    teacher_service: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT of a running teacher service: teachers come from it, cache first "
            "(cache URI from the config, else $EKD_CACHE_URI)"
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="address of a running Ray cluster: train there with Ray Train (execution.backend ray_train)"
        ),
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Run one experiment (training its missing teachers first) and report accuracy, sizes and time."""
    from trainer.report import plot_results, results_table, teacher_table, write_results_json

    cfg = with_cli_overrides(
        load_experiment(config, overrides or ()),
        output_dir=output_dir,
        teacher_service=teacher_service,
        ray_address=address,
    )
    results = []
    from trainer.run import run_experiment

    with ProgressBars() as bars:
        for seed in parse_seeds(seeds, cfg.seed):
            run_cfg = cfg.model_copy(update={"seed": seed})
            results.append(run_experiment(run_cfg, on_progress=bars, ray_address=address))
    run_dir = Path(results[0].run_dir)
    out_console.print(results_table(results, title=f"ekd distill {config}"))
    if (teachers := teacher_table(results)) is not None:
        out_console.print(teachers)
    json_path = write_results_json(results, run_dir / "results.json")
    plot_path = plot_results(results, run_dir / "accuracy_vs_params.png")
    err_console.print(f"results: {json_path}\nplot: {plot_path}")


@app.command()
@user_errors
def serve(
    config: Annotated[
        Path, typer.Argument(help="service config YAML, e.g. configs/serve/digits.yaml", show_default=False)
    ],
    overrides: SetOption = None,
) -> None:
    """Serve teachers locally: a local Ray, one Serve deployment per teacher, the gRPC ingress; Ctrl-C stops
    it."""
    from services.deployments import serve_locally
    from services.serve_config import load_serve_config

    def ready(address: str) -> None:
        out_console.print(f"teacher service ready at {address} (gRPC; Ctrl-C stops it)")

    serve_locally(load_serve_config(config, overrides or ()), on_ready=ready)


@app.command()
@user_errors
def demo(
    output_dir: Annotated[Path, typer.Option(help="where results, plots and students go")] = Path(
        "runs/demo"
    ),
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers per experiment")] = 2,
    epochs: Annotated[
        int,
        typer.Option(
            min=1,
            help="epochs per experiment (stage) of every student; 20 keeps "
            "the demo within 15 minutes on 2 cores",
        ),
    ] = 20,
    configs: Annotated[Path, typer.Option(help="the digits experiment configs")] = Path("configs/digits"),
    serve_config: Annotated[Path, typer.Option(help="the teacher service config")] = Path(
        "configs/serve/digits.yaml"
    ),
) -> None:
    """The whole system on digits: train (or reuse) teachers, serve them, distill seven ways on Ray Train."""
    from trainer.demo import demo_table, run_demo
    from trainer.report import plot_results, write_results_json

    with ProgressBars() as bars:
        rows = run_demo(
            configs_dir=configs,
            serve_config=serve_config,
            output_dir=output_dir,
            workers=workers,
            epochs=epochs,
            on_progress=bars,
        )
    out_console.print(demo_table(rows))
    results = [row.result for row in rows]
    json_path = write_results_json(results, output_dir / "results.json")
    plot_path = plot_results(results, output_dir / "accuracy_vs_params.png")
    err_console.print(f"results: {json_path}\nplot: {plot_path}")


def main() -> None:
    app()
