"""`ekd`: the command line (Typer + rich). Progress and logs go to stderr, tables to stdout.

Errors a user can fix (`services.core.errors.UserError`: a bad config, a missing dataset or checkpoint, a
service or cache that cannot be reached) print one short message and exit with status 2, without a traceback
(`--debug` shows it). Anything else is a bug: it exits with status 1 and its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.core.errors import ConfigError, UserError
from services.core.redaction import redact
from services.core.yaml_config import format_validation_error
from trainer.config import ExperimentConfig, load_experiment
from trainer.runs.progress import ProgressUpdate

app = typer.Typer(
    name="ekd",
    help="Ensemble knowledge distillation: served teachers, cached outputs, compact students.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
teachers_app = typer.Typer(help="Train the teachers ekd distills from.", no_args_is_help=True)
app.add_typer(teachers_app, name="teachers")
cache_app = typer.Typer(help="See, audit and prune the teacher-output cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

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
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, else the embedded store "
        "<output_dir>/mlflow.db)"
    ),
]
TrackingOption = Annotated[bool, typer.Option("--tracking/--no-tracking", help="log the runs to MLflow")]


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
    from trainer.runs.experiment import ensure_teachers
    from trainer.runs.inputs import load_splits
    from trainer.runs.loop import resolve_device

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
    baselines: Annotated[
        bool,
        typer.Option(
            help="also train each network the method exports alone with CE (same data, schedule and seeds; "
            "linked runs <name>-alone-<network> beside it) and show every student's gain over it"
        ),
    ] = False,
    tracking_uri: TrackingUriOption = None,
    tracking: TrackingOption = True,
    overrides: SetOption = None,
) -> None:
    """Run one experiment (training its missing teachers first) and report accuracy, sizes and time."""
    from trainer.results.baselines import alone_experiments
    from trainer.results.report import plot_results, results_table, teacher_table, write_results_json
    from trainer.tracking import Tracking, log_artifacts, tracked_experiment

    cfg = with_cli_overrides(
        load_experiment(config, overrides or ()),
        output_dir=output_dir,
        teacher_service=teacher_service,
        ray_address=address,
    )
    results = []
    from trainer.runs.run import run_experiment

    tracked = Tracking.resolve(cfg.output_dir, tracking_uri, tracking)
    run_ids = []

    def run_tracked(run_cfg: ExperimentConfig, bars: ProgressBars) -> None:
        result, run_id = tracked_experiment(
            tracked,
            run_cfg,
            functools.partial(run_experiment, run_cfg, on_progress=bars, ray_address=address),
        )
        results.append(result)
        run_ids.append(run_id)

    with ProgressBars() as bars, bank_misses_name_warm(config, overrides):
        for seed in parse_seeds(seeds, cfg.seed):
            run_tracked(cfg.model_copy(update={"seed": seed}), bars)
        if baselines:
            networks = [s.alone_network for s in results[0].students if s.alone_network is not None]
            for alone_cfg in alone_experiments(cfg, networks):
                for seed in parse_seeds(seeds, cfg.seed):
                    run_tracked(alone_cfg.model_copy(update={"seed": seed}), bars)
    run_dir = Path(results[0].run_dir)
    out_console.print(results_table(results, title=f"ekd distill {config}"))
    if (teachers := teacher_table(results)) is not None:
        out_console.print(teachers)
    json_path = write_results_json(results, run_dir / "results.json")
    plot_path = plot_results(results, run_dir / "accuracy_vs_params.png")
    log_artifacts(tracked, run_ids, [json_path, plot_path])
    err_console.print(f"results: {json_path}\nplot: {plot_path}")


@app.command()
@user_errors
def sweep(
    config: Annotated[
        Path,
        typer.Argument(
            help="an experiment YAML, swept as the options say, or a sweep YAML (it lists `experiments`), "
            "e.g. configs/digits/sweep_kd.yaml",
            show_default=False,
        ),
    ],
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help="field=v1,v2,...: every value of a field --set takes (values read as YAML), every "
            "combination with the other --grid fields; repeatable",
            show_default=False,
        ),
    ] = None,
    random: Annotated[
        list[str] | None,
        typer.Option(
            "--random",
            help="field=uniform:LOW:HIGH, loguniform:LOW:HIGH, randint:LOW:HIGH or choice:A,B: drawn "
            "--samples times per grid point; repeatable",
            show_default=False,
        ),
    ] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="random draws per grid point")] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds, swept like a field")] = None,
    concurrent: Annotated[int | None, typer.Option(min=1, help="trials at once (default 2)")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs per trial (default 1)")] = None,
    gpus_per_trial: Annotated[
        float | None, typer.Option(help="GPUs per trial (default: a share of the cluster's, if any)")
    ] = None,
    asha: Annotated[
        bool, typer.Option(help="stop trailing trials early on validation accuracy (Tune's ASHA)")
    ] = False,
    name: Annotated[str | None, typer.Option(help="the sweep's name (default: <experiment>-sweep)")] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="where the sweep's folder goes (default: the experiment's output_dir)")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="a running Ray cluster to run the trials on (default: a local Ray)")
    ] = None,
    teacher_service: Annotated[
        str | None, typer.Option(help="HOST:PORT of a running teacher service every trial reads from")
    ] = None,
    tracking_uri: TrackingUriOption = None,
    tracking: TrackingOption = True,
    overrides: SetOption = None,
) -> None:
    """Run many experiments as Ray Tune trials (a grid, random draws, seeds over any --set field); a rerun
    resumes the sweep; prints one table and writes a plot of accuracy against each swept field."""
    import time

    from trainer.sweep.plan import PLOT_FILE, RESULTS_FILE, plan_sweep, train_missing_teachers
    from trainer.sweep.report import plot_sweep, sweep_table, write_sweep_json
    from trainer.sweep.spec import sweep_spec
    from trainer.tracking import Tracking

    spec = sweep_spec(
        config,
        grid=grid or [],
        random=random or [],
        samples=samples,
        seeds=None if seeds is None else parse_seeds(seeds, 0),
        concurrent=concurrent,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        asha=asha,
        name=name,
        output_dir=output_dir,
        teacher_service=teacher_service,
        overrides=overrides or [],
    )
    plan = plan_sweep(spec)
    from trainer.sweep.ray_tune import run_sweep  # Ray is imported once every trial is valid

    tracked = Tracking.resolve(plan.directory.parent, tracking_uri, tracking)
    if tracked is not None:
        tracked.experiment_id(plan.name)  # the store and the experiment exist before the trials log to them
    with ProgressBars() as bars:
        train_missing_teachers(plan, bars)
    err_console.print(f"sweep {plan.name}: {len(plan.trials)} trials, {spec.concurrent} at a time")
    started = time.time()
    outcomes = run_sweep(
        spec,
        plan.trials,
        plan.configs,
        directory=plan.directory,
        sweep=plan.name,
        tracking=tracked,
        address=address,
    )
    seconds = time.time() - started
    out_console.print(sweep_table(outcomes, spec.swept_fields, f"ekd sweep {plan.name} ({seconds:.0f} s)"))
    json_path = write_sweep_json(outcomes, spec.swept_fields, seconds, plan.directory / RESULTS_FILE)
    plot_path = plot_sweep(outcomes, spec.swept_fields, plan.directory / PLOT_FILE)
    err_console.print(f"results: {json_path}\nplot: {plot_path}")


@app.command()
@user_errors
def evaluate(
    run_dir: Annotated[
        Path,
        typer.Argument(help="a run directory of `ekd distill`, e.g. runs/digits-okd", show_default=False),
    ],
) -> None:
    """Load every student a run exported (weights_only) and check it reproduces its recorded test accuracy;
    exit status 1 when one does not."""
    from rich.table import Table

    from trainer.runs.export import check_exports

    checks = check_exports(run_dir)
    table = Table(title=f"ekd evaluate {run_dir}")
    for column in ("seed", "export", "recorded", "loaded back", "reproduced"):
        table.add_column(column, justify="left" if column == "export" else "right")
    for check in checks:
        table.add_row(
            str(check.seed),
            check.name + (" (headline)" if check.headline else ""),
            f"{check.recorded:.4%}",
            f"{check.measured:.4%}",
            "yes" if check.reproduced else "NO",
        )
    out_console.print(table)
    if not all(check.reproduced for check in checks):
        raise typer.Exit(1)


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
    from services.serve.deployments import serve_locally
    from services.serve.serve_config import load_serve_config

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
    from trainer.cli.demo import demo_table, run_demo
    from trainer.results.report import plot_results, write_results_json

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


@contextlib.contextmanager
def bank_misses_name_warm(config: Path, overrides: list[str] | None) -> Iterator[None]:
    """A bank miss (teacher_source.kind: bank) in the block names the exact `ekd warm` command that fills the
    bank: this config file with its --set options."""
    from trainer.runs.sources import BankMissError

    try:
        yield
    except BankMissError as miss:
        sets = [arg for override in overrides or () for arg in ("--set", override)]
        raise miss.with_warm_command(shlex.join(["ekd", "warm", str(config), *sets])) from None


def _cache_uri(cfg: ExperimentConfig, cache: str | None) -> str:
    uri = cache or cfg.teacher_source.cache or os.environ.get("EKD_CACHE_URI")
    if not uri:
        raise ConfigError(
            "no cache to warm: give --cache URI, set teacher_source.cache in the experiment or $EKD_CACHE_URI"
        )
    return uri


@app.command()
@user_errors
def warm(
    config: ConfigArg,
    cache: Annotated[
        str | None, typer.Option(help="cache URI (default: the experiment's teacher_source.cache)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="views per teacher batch")] = 256,
    ray_address: Annotated[
        str | None, typer.Option(help="a running Ray cluster to run on (default: a private local one)")
    ] = None,
    tracking_uri: TrackingUriOption = None,
    tracking: TrackingOption = True,
    overrides: SetOption = None,
) -> None:
    """Precompute every teacher output the experiment trains from into the cache (a Ray Data job), in the
    form teacher_source.soft_labels names; what is cached already is skipped, so it resumes."""
    from trainer.bank.warm import warm_bank
    from trainer.runs.experiment import ensure_teachers
    from trainer.runs.inputs import load_splits
    from trainer.runs.loop import resolve_device
    from trainer.tracking import Tracking, log_warm

    cfg = load_experiment(config, overrides or ())
    uri = _cache_uri(cfg, cache)
    tracked = Tracking.resolve(cfg.output_dir, tracking_uri, tracking)
    if tracked is not None:
        tracked.experiment_id(cfg.name)  # a tracking store that cannot be used fails before the job
    with ProgressBars() as bars:
        ensure_teachers(cfg, load_splits(cfg), resolve_device(cfg.device), bars)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} views/s, {task.fields[written]} written"),
        TimeElapsedColumn(),
        console=err_console,
    )
    tasks: dict[str, TaskID] = {}

    def on_batch(teachers) -> None:
        for teacher in teachers:
            if teacher.name not in tasks:
                tasks[teacher.name] = progress.add_task(
                    teacher.name, total=teacher.total, rate="0", written="0 B"
                )
            progress.update(
                tasks[teacher.name],
                completed=teacher.views,
                rate=f"{teacher.views_per_second:,.0f}",
                written=_bytes(teacher.bytes_written),
            )

    with progress:
        warmed = warm_bank(cfg, uri, batch_size=batch_size, ray_address=ray_address, on_batch=on_batch)
    log_warm(tracked, cfg, uri, batch_size, warmed)
    table = Table(title=f"ekd warm {cfg.name} -> {redact(uri)}")
    for column in (
        "teacher",
        "tag",
        "outputs",
        "form",
        "views",
        "already cached",
        "computed",
        "bytes written",
    ):
        table.add_column(
            column, justify="left" if column in ("teacher", "tag", "outputs", "form") else "right"
        )
    table.add_column("views/s", justify="right")
    for t in warmed:
        table.add_row(
            t.name,
            t.tag,
            ", ".join(t.outputs),
            t.form,
            f"{t.views:,}",
            f"{t.cached:,}",
            f"{t.computed:,}",
            _bytes(t.bytes_written),
            f"{t.views_per_second:,.0f}",
        )
    out_console.print(table)


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


@cache_app.command("stats")
@user_errors
def cache_stats(
    uri: Annotated[str, typer.Argument(help="cache URI: lmdb:///path, a path, or redis://host:port/db")],
    views: Annotated[int, typer.Option(min=1, help="replayed views per image of the ImageNet estimate")] = 16,
) -> None:
    """Entries and bytes per teacher, output and form (from the keys, without reading values), what an entry
    costs the store all-in (key, value and the store's overhead: LMDB's pages, Redis's MEMORY USAGE), and
    what a full ImageNet bank would take at that."""
    from services.cache import open_store
    from services.cache.inventory import IMAGENET_TRAIN_IMAGES, inventory

    with open_store(uri) as store:
        groups, unrecognized = inventory(store)
    table = Table(title=f"ekd cache {redact(uri)}")
    for column in ("teacher tag", "output", "form", "entries", "key bytes", "value bytes", "all-in B/entry"):
        table.add_column(column, justify="left" if column in ("teacher tag", "output", "form") else "right")
    table.add_column(f"ImageNet bank ({views} views)", justify="right")
    for g in groups:
        per_entry = g.all_in_bytes if g.all_in_bytes is not None else g.bytes_per_entry
        table.add_row(
            g.tag,
            g.output,
            g.form,
            f"{g.entries:,}",
            _bytes(g.key_bytes),
            _bytes(g.value_bytes),
            f"{per_entry:,.0f}",
            _bytes(per_entry * IMAGENET_TRAIN_IMAGES * views),
        )
    out_console.print(table)
    total = sum(g.key_bytes + g.value_bytes for g in groups)
    out_console.print(
        f"{sum(g.entries for g in groups):,} entries, {_bytes(total)} of keys and values"
        + (f"; {unrecognized} other keys under the namespace" if unrecognized else "")
    )


@cache_app.command("verify")
@user_errors
def cache_verify(
    uri: Annotated[str, typer.Argument(help="cache URI")],
    config: ConfigArg,
    sample: Annotated[int, typer.Option(min=1, help="entries to recompute per teacher output")] = 64,
    fix: Annotated[bool, typer.Option(help="delete the entries beyond tolerance")] = False,
    logit_tolerance: Annotated[float, typer.Option(min=0)] = 0.05,
    probability_tolerance: Annotated[float, typer.Option(min=0)] = 0.005,
    service: Annotated[
        str | None,
        typer.Option(help="recompute on the teacher service at this host:port (default: here)"),
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Recompute a random sample of the experiment's cached teacher outputs with the teachers (here, or on the
    teacher service with --service) and report the largest deviations (logits; probabilities at the
    experiment's temperature)."""
    from services.cache import open_store
    from trainer.bank.audit import verify_cache

    cfg = load_experiment(config, overrides or ())
    with open_store(uri) as store:
        audits = verify_cache(
            cfg,
            store,
            sample,
            logit_tolerance=logit_tolerance,
            probability_tolerance=probability_tolerance,
            fix=fix,
            service=service,
        )
    temperature = getattr(cfg.method, "temperature", 1.0)
    table = Table(title=f"ekd cache verify {redact(uri)} against {cfg.name} (T = {temperature:g})")
    for column in ("teacher", "tag", "output", "form", "checked", "max |Δ logit|", "max |Δ p|", "beyond"):
        table.add_column(
            column, justify="left" if column in ("teacher", "tag", "output", "form") else "right"
        )
    for a in audits:
        table.add_row(
            a.teacher,
            a.tag,
            a.output,
            a.form,
            str(a.checked),
            f"{a.max_logit_deviation:.4g}",
            f"{a.max_probability_deviation:.3g}",
            f"{len(a.bad)}" + (" (deleted)" if fix and a.bad else ""),
        )
    out_console.print(table)
    if any(a.bad for a in audits) and not fix:
        raise typer.Exit(1)


@cache_app.command("evict")
@user_errors
def cache_evict(
    uri: Annotated[str, typer.Argument(help="cache URI")],
    teacher: Annotated[str, typer.Option(help="the teacher's identity, or its 12-character key tag")],
) -> None:
    """Drop every entry of one teacher."""
    from services.cache import open_store
    from services.cache.inventory import evict_teacher

    with open_store(uri) as store:
        deleted = evict_teacher(store, teacher)
    out_console.print(f"deleted {deleted:,} entries of teacher {teacher} from {redact(uri)}")


@cache_app.command("pack")
@user_errors
def cache_pack(
    uri: Annotated[str, typer.Argument(help="LMDB cache URI (lmdb:///path or a path)")],
    destination: Annotated[Path, typer.Argument(help="a new folder for the packed copy", show_default=False)],
) -> None:
    """Copy an LMDB cache into a new folder in key order, its leaf pages full (a bank written in hash order
    fills them about 69 %: compact entries 143 -> 98 bytes each); point the runs at the copy."""
    from services.cache import open_store
    from services.cache.lmdb_store import LmdbStore

    with open_store(uri) as store:
        if not isinstance(store, LmdbStore):
            raise UserError(f"ekd cache pack copies an LMDB cache; {redact(uri)} is not one")
        copied = store.copy_packed(destination)
    out_console.print(f"packed {copied:,} entries of {redact(uri)} into {destination}")


BankRayAddress = Annotated[
    str | None, typer.Option(help="a running Ray cluster to run on (default: a private local one)")
]


@cache_app.command("export")
@user_errors
def cache_export(
    uri: Annotated[str, typer.Argument(help="cache URI to export")],
    directory: Annotated[Path, typer.Argument(help="a new directory for the bank", show_default=False)],
    entries_per_shard: Annotated[
        int | None, typer.Option(min=1, help="entries per Parquet shard  [default: 100,000]")
    ] = None,
    ray_address: BankRayAddress = None,
) -> None:
    """Export every entry of a cache as a bank another store can import: Parquet shards of keys and stored
    values (HMAC tags kept) and a manifest of entries, forms and sha256 per shard (a Ray Data job)."""
    from trainer.bank.ray_transfer import OverRayData
    from trainer.bank.transfer import export_bank

    manifest = export_bank(uri, directory, OverRayData(ray_address), entries_per_shard=entries_per_shard)
    out_console.print(
        f"exported {manifest.entries:,} entries of {redact(uri)} to {directory} "
        f"in {len(manifest.shards)} shards" + (" (HMAC-tagged)" if manifest.authenticated else "")
    )


@cache_app.command("import")
@user_errors
def cache_import(
    directory: Annotated[Path, typer.Argument(help="a bank `ekd cache export` wrote", show_default=False)],
    uri: Annotated[str, typer.Argument(help="cache URI to import into")],
    source_hmac_key_file: Annotated[
        Path | None,
        typer.Option(help="file holding the exporter's HMAC secret, when it is not this store's own"),
    ] = None,
    ray_address: BankRayAddress = None,
) -> None:
    """Import a bank into a cache (a Ray Data job). Each shard is checked whole first (sha256, entries, HMAC
    tags under the exporter's secret); one that fails is named and not imported (exit status 2)."""
    from trainer.bank.ray_transfer import OverRayData
    from trainer.bank.transfer import BankError, import_bank, read_secret

    secret = read_secret(source_hmac_key_file) if source_hmac_key_file is not None else None
    shards = import_bank(directory, uri, OverRayData(ray_address), source_hmac_key=secret)
    written = [shard for shard in shards if shard.problem is None]
    out_console.print(
        f"imported {sum(shard.entries for shard in written):,} entries from {len(written)} of {len(shards)} "
        f"shards of {directory} into {redact(uri)}"
    )
    if failed := [shard for shard in shards if shard.problem is not None]:
        named = "; ".join(f"{shard.file}: {shard.problem}" for shard in failed)
        raise BankError(f"not imported: {named} (the other {len(written)} shards were)")


def main() -> None:
    app()
