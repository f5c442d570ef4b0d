"""What a sweep is, in plain Python: the experiments, the fields swept (a grid, random draws, seeds) and how
the trials run; and its trials, each an experiment config validated before anything runs.

A field is any key `--set` takes (`method.temperature`, `data.subset_seed`, `teachers.0.checkpoint`). A sweep
comes from `ekd sweep` flags over one experiment YAML, or from a sweep YAML (`SweepSpec`'s fields; it has
`experiments`, a list of experiment YAMLs, swept like a field).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.core.errors import ConfigError
from services.core.yaml_config import apply_overrides, format_validation_error, load_yaml_model
from trainer.config import ExperimentConfig, check_experiment_name

SEED_FIELD = "seed"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Section):
    """A random draw of one field: exactly one of uniform, loguniform, randint (low <= value < high) or
    choice."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in Distribution.model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of uniform, loguniform, randint, choice (got {given or 'none'})"
            )
        low_high = self.uniform or self.loguniform or self.randint
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"needs low < high, got {list(low_high)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs positive bounds, got {list(self.loguniform)}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self

    def draw(self, rng: random.Random) -> Any:
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        if self.loguniform is not None:
            low, high = self.loguniform
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.randint is not None:
            return rng.randrange(*self.randint)
        assert self.choice is not None  # _exactly_one
        return rng.choice(self.choice)

    @classmethod
    def parse(cls, text: str) -> Distribution:
        """`uniform:LOW:HIGH`, `loguniform:LOW:HIGH`, `randint:LOW:HIGH` or `choice:A,B,C` (values YAML)."""
        kind, _, rest = text.partition(":")
        if kind == "choice":
            return cls(choice=[yaml.safe_load(v) for v in rest.split(",")])
        if kind in ("uniform", "loguniform", "randint"):
            return cls.model_validate({kind: rest.split(":")})
        raise ValueError(
            f"{text!r}: use uniform:LOW:HIGH, loguniform:LOW:HIGH, randint:LOW:HIGH or choice:A,B,C"
        )


class AshaSettings(_Section):
    """Early stopping of the trials whose validation accuracy trails (Tune's ASHA scheduler)."""

    grace_period: int = Field(1, ge=1, description="epochs every trial trains before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="1/reduction_factor of the trials go on per rung")


class ExperimentEntry(_Section):
    """An experiment YAML with overrides of its own (after the sweep's `set`)."""

    path: str
    set: list[str] = Field(default_factory=list)


class SweepSpec(_Section):
    experiments: list[str | ExperimentEntry] = Field(
        min_length=1, description="experiment YAMLs (or {path, set}), swept like a field"
    )
    name: str | None = Field(
        None, description="the sweep's name: its folder under output_dir (default: <experiment>-sweep)"
    )
    set: list[str] = Field(
        default_factory=list,
        description="dotted.key=value overrides of every trial; {field} in a value is that swept field's "
        "value in the trial (e.g. a teacher checkpoint per data.train_fraction)",
    )
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="field: values, every combination")
    random: dict[str, Distribution] = Field(default_factory=dict, description="field: a distribution")
    samples: int = Field(1, ge=1, le=10_000, description="random draws per grid point")
    seeds: list[int] | None = Field(None, description="the experiments' `seed` values, swept like a field")
    sample_seed: int = Field(0, ge=0, description="seed of the random draws (the trials are drawn once)")
    concurrent: int = Field(2, ge=1, le=1024, description="trials running at once")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs Ray reserves for each trial")
    gpus_per_trial: float | None = Field(
        None,
        ge=0,
        description="GPUs Ray reserves for each trial; None: a share of the cluster's GPUs, if any",
    )
    asha: AshaSettings | None = Field(None, description="stop trailing trials early on validation accuracy")
    output_dir: str | None = Field(None, description="default: the first experiment's output_dir")
    baselines: bool = Field(
        False,
        description="each trial also trains every network its method exports alone with CE (as "
        "`ekd distill --baselines`: linked runs <trial>-alone-<network> beside it)",
    )

    @model_validator(mode="after")
    def _fields_once(self) -> SweepSpec:
        swept = [*self.grid, *self.random] + ([SEED_FIELD] if self.seeds is not None else [])
        twice = sorted({f for f in swept if swept.count(f) > 1})
        if twice:
            raise ValueError(f"fields swept twice (grid, random, seeds): {', '.join(twice)}")
        empty = [field for field, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"grid fields without values: {', '.join(empty)}")
        if self.name is not None:
            check_experiment_name(self.name)
        return self

    @property
    def swept_fields(self) -> list[str]:
        fields = [*self.grid, *self.random]
        if self.seeds is not None:
            fields.append(SEED_FIELD)
        return fields


@dataclass(frozen=True)
class Trial:
    """One trial: its id, the experiment YAML, the swept fields' values, and the validated config."""

    id: str
    experiment: str
    fields: dict[str, Any]
    config: ExperimentConfig


def parse_grid(options: list[str]) -> dict[str, list[Any]]:
    """`field=v1,v2,...` options (values read as YAML) as a grid."""
    grid: dict[str, list[Any]] = {}
    for option in options:
        field, values = _field_and_text(option, "--grid", "field=v1,v2")
        try:
            grid[field] = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError as err:
            raise ConfigError(f"--grid {option}: a value is not valid YAML: {err}".splitlines()[0]) from None
    return grid


def parse_random(options: list[str]) -> dict[str, Distribution]:
    """`field=uniform:1:8`-style options as distributions."""
    drawn = {}
    for option in options:
        field, text = _field_and_text(option, "--random", "field=uniform:LOW:HIGH")
        try:
            drawn[field] = Distribution.parse(text)
        except (ValueError, ValidationError) as err:
            shown = format_validation_error(err).strip() if isinstance(err, ValidationError) else str(err)
            raise ConfigError(f"--random {option}: {shown}") from None
    return drawn


def _field_and_text(option: str, flag: str, example: str) -> tuple[str, str]:
    field, separator, text = option.partition("=")
    if not separator or not field or not text:
        raise ConfigError(f"{flag} {option!r}: use {example}")
    return field, text


def load_sweep(path: str | Path) -> SweepSpec:
    return load_yaml_model(path, SweepSpec, what="sweep")


def is_sweep_file(path: str | Path) -> bool:
    """Whether a YAML file is a sweep (it lists `experiments`) rather than one experiment."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the experiment loader says what is wrong with it
    return isinstance(raw, dict) and "experiments" in raw


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _override(field: str, value: Any) -> str:
    return f"{field}={json.dumps(value)}"  # JSON is YAML: the value keeps its type


_TEMPLATE = re.compile(r"\{([A-Za-z0-9_.]+)\}")


@dataclass(frozen=True)
class _Base:
    """One experiment of the sweep: its config with the overrides that name no field, validated, and those
    that do (resolved per trial)."""

    path: str
    raw: dict
    templated: list[str]

    @classmethod
    def of(cls, entry: str | ExperimentEntry, spec: SweepSpec) -> _Base:
        path, own = (entry, []) if isinstance(entry, str) else (entry.path, entry.set)
        overrides = [*spec.set, *own]
        fixed = [o for o in overrides if not _TEMPLATE.search(o)]
        cfg = load_yaml_model(path, ExperimentConfig, what="experiment", overrides=fixed)
        return cls(path, cfg.model_dump(mode="json"), [o for o in overrides if _TEMPLATE.search(o)])

    def overrides(self, fields: dict[str, Any]) -> list[str]:
        """The templated overrides with the trial's field values, then the fields themselves."""

        def value(match: re.Match) -> str:
            if match.group(1) not in fields:
                raise ConfigError(f"sweep: {match.group(0)} in a `set` value names no swept field")
            return _shown(fields[match.group(1)])

        resolved = [_TEMPLATE.sub(value, o) for o in self.templated]
        return resolved + [_override(k, v) for k, v in fields.items()]


def _validated(raw: dict, overrides: list[str], where: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(apply_overrides(raw, overrides, what="experiment"))
    except ValidationError as err:
        problem = err.errors()[0]
        loc = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        raise ConfigError(f"sweep: {where}: {loc}: {problem['msg']}") from None
    except ConfigError as err:
        raise ConfigError(f"sweep: {where}: {err}") from None


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep, each config validated: first every swept value alone (so that a bad one is
    one line naming its field and value), then every combination. Random draws come from `sample_seed`, so
    the same spec gives the same trials."""
    bases = [_Base.of(entry, spec) for entry in spec.experiments]
    axes: dict[str, list[Any]] = dict(spec.grid)
    if spec.seeds is not None:
        axes[SEED_FIELD] = list(spec.seeds)
    for base in bases:
        if base.templated:
            continue  # its values are checked in their trials, with the fields the templates name
        for field, values in axes.items():
            for value in values:
                _validated(base.raw, [_override(field, value)], f"{field}={_shown(value)}")
    rng = random.Random(spec.sample_seed)
    trials: list[Trial] = []
    combinations = list(itertools.product(*axes.values()))
    for base in bases:
        for combination in combinations:
            for _ in range(spec.samples if spec.random else 1):
                fields = dict(zip(axes, combination))
                fields.update({field: d.draw(rng) for field, d in spec.random.items()})
                shown = ", ".join(f"{k}={_shown(v)}" for k, v in fields.items()) or "the experiment as it is"
                cfg = _validated(base.raw, base.overrides(fields), shown)
                trials.append(Trial(f"t{len(trials):03d}", base.path, fields, cfg))
    return trials


def sweep_name(spec: SweepSpec, trials: list[Trial]) -> str:
    return spec.name or f"{trials[0].config.name}-sweep"


def sweep_dir(spec: SweepSpec, trials: list[Trial]) -> Path:
    """The sweep's folder: its trials' runs, the record of ended trials, Tune's folder, the table's JSON and
    the plot."""
    root = spec.output_dir if spec.output_dir is not None else trials[0].config.output_dir
    return Path(root).absolute() / sweep_name(spec, trials)


def trial_config(trial: Trial, directory: Path) -> ExperimentConfig:
    """The config a trial runs: its own name (`<experiment>-<trial id>`) under the sweep's `trials/`, every
    path absolute (a Tune trial runs in a folder of its own, maybe on another node)."""
    data = trial.config.model_dump(mode="json")
    data.update(name=f"{trial.config.name}-{trial.id}", output_dir=str(directory / "trials"))
    return ExperimentConfig.model_validate(data).with_absolute_paths()


def sweep_spec(
    config: Path,
    *,
    grid: list[str],
    random: list[str],
    samples: int | None,
    seeds: list[int] | None,
    concurrent: int | None,
    cpus_per_trial: float | None,
    gpus_per_trial: float | None,
    asha: bool,
    name: str | None,
    output_dir: Path | None,
    teacher_service: str | None,
    overrides: list[str],
) -> SweepSpec:
    """The sweep `ekd sweep` asks for: a sweep YAML, or an experiment YAML with the flags; the flags given
    add to or replace the sweep YAML's fields (`--set`s are appended: the last one of a field wins)."""
    base: dict[str, Any] = (
        load_sweep(config).model_dump() if is_sweep_file(config) else {"experiments": [str(config)]}
    )
    served = ["teacher_source.kind=served", f"teacher_source.address={teacher_service}"]
    base["set"] = [*base.get("set", []), *(served if teacher_service else []), *overrides]
    base["grid"] = {**base.get("grid", {}), **parse_grid(grid)}
    base["random"] = {**base.get("random", {}), **parse_random(random)}
    given: dict[str, Any] = {
        "samples": samples,
        "seeds": seeds,
        "concurrent": concurrent,
        "cpus_per_trial": cpus_per_trial,
        "gpus_per_trial": gpus_per_trial,
        "asha": AshaSettings() if asha and not base.get("asha") else None,
        "name": name,
        "output_dir": None if output_dir is None else str(output_dir),
    }
    base.update({key: value for key, value in given.items() if value is not None})
    try:
        return SweepSpec.model_validate(base)
    except ValidationError as err:
        raise ConfigError(f"{config}: invalid sweep\n{format_validation_error(err)}") from None
