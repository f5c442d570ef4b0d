"""The headline job rehearsed at true shape on the CPU: the seed-000 recipe (legacy_senet154 + resnet152 ->
L1-pruned ResNet-50, configs/imagenet/seed000_ensemble_kd.yaml) at 224x224, every way ekd runs it.

It makes what it needs, nothing downloaded: the three weights files (random initialisation, safetensors, in
the published layouts and shapes, over the folder's classes), and an ImageNet-layout folder of real JPEG files
at ImageNet-like sizes (500x375, written with PIL). Then, each stage in a process of its own (its peak RSS is
that process's; Ray's and the teacher server's processes are not counted):

- ce: the student alone with CE (the baseline a user would pick instead), `warm_epochs` epochs;
- kd_in_process: KD with both teachers run in the training process, `kd_epochs` epochs;
- warm_full, warm_compact: `ekd warm` (the Ray Data job) of the training views into an LMDB bank, in fp16
  and in the compact soft-label form;
- kd_warm_served: KD from the full bank through the teacher service (gRPC on 127.0.0.1, no Ray), every view
  a cache hit, `warm_epochs` epochs;
- kd_cold_ray_serve: KD with an empty cache through the teacher service on Ray Serve (one deployment per
  teacher, dynamic batching), `kd_epochs` epochs.
(Training from the bank alone, with no service, is not a teacher source yet.)

One table: each stage's wall time, optimizer steps/s, the share of it the student waited for teachers (stall),
teacher calls, peak RSS and stored bytes per view; and the ratios warm KD ÷ CE (seconds per step) and cold
served ÷ in process (steps/s). Written as JSON too.

    .venv/bin/python benchmarks/rehearsal.py --readme benchmarks/README.md   # the full run, into the README
    .venv/bin/python benchmarks/rehearsal.py --render runs/rehearsal/full/rehearsal.json  # re-render a run
    .venv/bin/python benchmarks/rehearsal.py --quick    # a smoke check, under 5 minutes on 2 cores
    .venv/bin/python benchmarks/rehearsal.py --scale gpu --device cuda   # what benchmarks/gpu_check.sh runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "imagenet" / "seed000_ensemble_kd.yaml"
TEACHER_ARCHITECTURES = ("legacy_senet154", "resnet152")
STAGES = ("ce", "kd_in_process", "warm_full", "warm_compact", "kd_warm_served", "kd_cold_ray_serve")


@dataclass(frozen=True)
class Scale:
    classes: int
    train_per_class: int
    val_per_class: int
    views: int
    batch_size: int
    kd_epochs: int
    warm_epochs: int


FULL = Scale(
    classes=8, train_per_class=16, val_per_class=4, views=2, batch_size=16, kd_epochs=2, warm_epochs=6
)
# The GPU check's scale (benchmarks/gpu_check.sh): the student at batch 256, enough steps to time.
GPU = Scale(
    classes=10, train_per_class=128, val_per_class=8, views=1, batch_size=256, kd_epochs=1, warm_epochs=2
)
QUICK = Scale(
    classes=2, train_per_class=8, val_per_class=2, views=1, batch_size=8, kd_epochs=1, warm_epochs=1
)
SCALES = {"full": FULL, "gpu": GPU, "quick": QUICK}


@dataclass
class StageResult:
    stage: str
    seconds: float
    optimizer_steps: int = 0
    stall_seconds: float = 0.0
    teacher_calls: int = 0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    bytes_per_view: float | None = None
    views_per_second: float | None = None

    @property
    def steps_per_second(self) -> float | None:
        return self.optimizer_steps / self.seconds if self.optimizer_steps and self.seconds else None


# ---- what the rehearsal makes ------------------------------------------------------------------------------


def write_image_folder(root: Path, scale: Scale) -> None:
    """<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, 500x375 (landscape) and 375x500 (portrait)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", scale.train_per_class), ("val", scale.val_per_class)):
        for label in range(scale.classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                width, height = (500, 375) if k % 2 == 0 else (375, 500)
                pixels = rng.normal(90 + 20 * label, 40, (height, width, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{label}_{k}.JPEG", quality=90)


def write_weights(directory: Path, num_classes: int) -> dict[str, Path]:
    """Random-initialised teachers and the ResNet-50 to prune, as safetensors in their published layouts."""
    import safetensors.torch
    import timm

    from services.teachers.zoo import create_teacher

    paths = {}
    for name in TEACHER_ARCHITECTURES:
        paths[name] = directory / f"{name}.safetensors"
        safetensors.torch.save_file(create_teacher(name, num_classes).model.state_dict(), paths[name])
    paths["resnet50"] = directory / "resnet50.safetensors"
    safetensors.torch.save_file(
        timm.create_model("resnet50", num_classes=num_classes).state_dict(), paths["resnet50"]
    )
    return paths


DEVICE = os.environ.get("EKD_REHEARSAL_DEVICE", "cpu")
"""Where the student and the in-process teachers run: `--device` sets it for every stage's process."""


def experiment(work: Path, scale: Scale, name: str, epochs: int, method: dict | None = None, **source):
    """The recipe with this machine's data, weights and sizes; `method` replaces the recipe's method."""
    from trainer.config import ExperimentConfig, load_experiment

    weights = work / "weights"
    overrides = [
        f"name=rehearsal-{name}",
        f"data.root={work / 'imagenet'}",
        f"data.views={scale.views}",
        f"data.batch_size={scale.batch_size}",
        "data.val_fraction=0",
        "data.workers=1",
        f"teachers.0.checkpoint={weights / 'legacy_senet154.safetensors'}",
        f"teachers.1.checkpoint={weights / 'resnet152.safetensors'}",
        f"method.student.options.source_checkpoint={weights / 'resnet50.safetensors'}",
        f"train.epochs={epochs}",
        "train.warmup_epochs=0",
        f"device={DEVICE}",
        f"output_dir={work / 'runs'}",
    ]
    cfg = load_experiment(RECIPE, overrides).model_dump()
    for index, teacher in enumerate(cfg["teachers"]):
        teacher["served_as"] = TEACHER_ARCHITECTURES[index]
    if method is not None:  # a method of no teachers (CE)
        cfg["method"] = {**method, "student": cfg["method"]["student"]}
        cfg["teachers"] = []
    cfg["teacher_source"].update(source)
    return ExperimentConfig.model_validate(cfg)


# ---- the stages (each runs in a process of its own: `--stage NAME --work DIR`) ---------------------------


def trained(stage: str, cfg) -> StageResult:
    from trainer.runs.run import run_experiment

    started = time.perf_counter()
    result = run_experiment(cfg)
    return StageResult(
        stage,
        time.perf_counter() - started,
        optimizer_steps=result.optimizer_steps,
        stall_seconds=result.stall_seconds,
        teacher_calls=int(result.counters.get("teacher_calls", 0)),
    )


def bytes_per_view(cache_uri: str) -> float:
    """Key and value bytes per stored entry, as the store reports them (without the store's own overhead)."""
    from services.cache import open_store

    with open_store(cache_uri) as store:
        sizes = [len(key) + size for key, size in store.scan()]
    return sum(sizes) / len(sizes) if sizes else 0.0


def served_engines(cfg) -> dict:
    from services.teachers.engine import TeacherEngine
    from services.teachers.zoo import create_teacher
    from trainer.runs.inputs import load_splits

    classes = load_splits(cfg).num_classes
    return {t.served_as: TeacherEngine(create_teacher(t.name, classes, t.checkpoint)) for t in cfg.teachers}


def run_stage(stage: str, work: Path, scale: Scale) -> StageResult:
    bank = f"lmdb://{work / 'bank'}"
    if stage == "ce":
        return trained(stage, experiment(work, scale, stage, scale.warm_epochs, method={"name": "ce"}))
    if stage == "kd_in_process":
        return trained(stage, experiment(work, scale, stage, scale.kd_epochs))
    if stage in ("warm_full", "warm_compact"):
        from trainer.bank.warm import warm_bank

        form = stage.removeprefix("warm_")
        uri = bank if form == "full" else f"lmdb://{work / 'bank-compact'}"
        cfg = experiment(work, scale, stage, scale.kd_epochs, soft_labels=form)
        started = time.perf_counter()
        warmed = warm_bank(cfg, uri, batch_size=scale.batch_size)
        seconds = time.perf_counter() - started
        views = sum(teacher.computed for teacher in warmed)
        return StageResult(
            stage,
            seconds,
            teacher_calls=views,
            bytes_per_view=bytes_per_view(uri),
            views_per_second=views / seconds / len(warmed),
        )
    if stage == "kd_warm_served":
        from services.cache import open_store
        from services.rpc.backends import LocalBackend
        from services.rpc.server import BackgroundServer

        base = experiment(work, scale, stage, scale.warm_epochs)
        with BackgroundServer(LocalBackend(served_engines(base)), store=open_store(bank)) as server:
            cfg = experiment(
                work, scale, stage, scale.warm_epochs, kind="served", address=server.address, cache=bank
            )
            return trained(stage, cfg)
    if stage == "kd_cold_ray_serve":
        import ray

        from services.serve.deployments import deploy
        from services.serve.serve_config import GrpcConfig, ServeConfig, TeacherDeploymentConfig

        base = experiment(work, scale, stage, scale.kd_epochs)
        teachers = [
            TeacherDeploymentConfig(
                name=t.served_as,
                architecture=t.name,
                num_classes=scale.classes,
                checkpoint=t.checkpoint,
                num_cpus=0,
            )
            for t in base.teachers
        ]
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            address = deploy(ServeConfig(teachers=teachers, grpc=GrpcConfig(port=0)))
            cold = f"lmdb://{work / 'cold-cache'}"
            return trained(
                stage,
                experiment(work, scale, stage, scale.kd_epochs, kind="served", address=address, cache=cold),
            )
        finally:
            ray.shutdown()
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


# ---- the driver ----------------------------------------------------------------------------------------


def prepare(work: Path, scale: Scale, console: Console) -> None:
    if not (work / "imagenet").exists():
        console.print(f"writing {scale.classes} classes of 500x375 JPEGs to {work / 'imagenet'}")
        write_image_folder(work / "imagenet", scale)
    if not (work / "weights" / "resnet50.safetensors").exists():
        console.print("writing random-initialised legacy_senet154, resnet152 and resnet50 safetensors")
        (work / "weights").mkdir(parents=True, exist_ok=True)
        write_weights(work / "weights", scale.classes)


def run_in_process_of_its_own(stage: str, root: Path, work: Path, scale_name: str) -> StageResult:
    out = work / f"{stage}.json"
    command = [
        sys.executable,
        __file__,
        "--stage",
        stage,
        "--work",
        str(root),
        "--scale",
        scale_name,
    ]
    # Ray's workers (teacher replicas, warm actors) at the trainer's priority, not Ray's default nice 15: the
    # figures compare the paths, not the scheduler's shares on a machine the trainer keeps busy.
    env = {"RAY_worker_niceness": "0", **os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env)
    return StageResult(**json.loads(out.read_text()))


def table(results: dict[str, StageResult], title: str) -> Table:
    shown = Table(title=title)
    for column in (
        "stage",
        "wall s",
        "steps/s",
        "stall",
        "teacher calls",
        "peak RSS",
        "stored B/view",
        "views/s",
    ):
        shown.add_column(column, justify="left" if column == "stage" else "right")
    for result in results.values():
        shown.add_row(
            result.stage,
            f"{result.seconds:.1f}",
            f"{result.steps_per_second:.3f}" if result.steps_per_second else "—",
            f"{result.stall_seconds / result.seconds:.1%}" if result.optimizer_steps else "—",
            f"{result.teacher_calls:,}",
            f"{result.peak_rss_bytes / 2**30:.2f} GiB",
            f"{result.bytes_per_view:,.0f}" if result.bytes_per_view is not None else "—",
            f"{result.views_per_second:.2f}" if result.views_per_second is not None else "—",
        )
    return shown


def ratio_table(ratios: dict[str, float]) -> Table:
    shown = Table(title="ratios")
    shown.add_column("ratio")
    shown.add_column("value", justify="right")
    for name, value in ratios.items():
        shown.add_row(name, f"{value:.2f}")
    return shown


README_BEGIN = "<!-- rehearsal:BEGIN -->"
README_END = "<!-- rehearsal:END -->"


def markdown(report: dict) -> str:
    """The report as the markdown block benchmarks/README.md carries (`--readme`)."""
    scale = report["scale"]
    lines = [
        f"{scale['classes']} classes x {scale['train_per_class']} training images (500x375 JPEGs) at "
        f"224², {scale['views']} views, batch {scale['batch_size']}; KD {scale['kd_epochs']} epochs, CE and "
        f"warm KD {scale['warm_epochs']}; device {report['device']}, {report['cpus']} CPUs, 1-minute load "
        f"{report['load_average_1m']:.1f} at the end; {report['seconds'] / 60:.1f} min in all.",
        "",
        "| stage | wall s | steps/s | stall | teacher calls | peak RSS | stored B/view | views/s a teacher |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, stage in report["stages"].items():
        steps, stored, rate = stage["steps_per_second"], stage["bytes_per_view"], stage["views_per_second"]
        stall = stage["stall_seconds"] / stage["seconds"] if stage["optimizer_steps"] else None
        cells = [
            name,
            f"{stage['seconds']:.1f}",
            f"{steps:.3f}" if steps else "—",
            f"{stall:.1%}" if stall is not None else "—",
            f"{stage['teacher_calls']:,}",
            f"{stage['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"{stored:,.0f}" if stored is not None else "—",
            f"{rate:.2f}" if rate is not None else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in report["ratios"].items()]
    return "\n".join(lines)


def write_into_readme(report: dict, readme: Path) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} block to write the table into")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{markdown(report)}\n{README_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke-check scale (under 5 minutes)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="the data and schedule sizes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=DEVICE, help="the student's device")
    parser.add_argument(
        "--work", type=Path, default=REPO / "runs" / "rehearsal", help="where everything goes"
    )
    parser.add_argument(
        "--readme", type=Path, help="write the table into this markdown file's rehearsal block"
    )
    parser.add_argument("--render", type=Path, help="only write a rehearsal.json's table into --readme")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        write_into_readme(
            json.loads(args.render.read_text()), args.readme or REPO / "benchmarks" / "README.md"
        )
        return
    scale_name = "quick" if args.quick else args.scale
    scale = SCALES[scale_name]
    work = args.work.resolve() / scale_name
    os.environ["EKD_REHEARSAL_DEVICE"] = args.device  # for every stage's process
    if args.stage:  # one stage, in this process: its result and peak RSS to <work>/<stage>.json
        result = run_stage(args.stage, work, scale)
        result.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if torch.cuda.is_available():
            result.peak_gpu_bytes = torch.cuda.max_memory_allocated()
        (work / f"{args.stage}.json").write_text(json.dumps(asdict(result)))
        return
    console = Console(stderr=True)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, scale, console)
    started = time.perf_counter()
    results = {}
    for stage in STAGES:
        console.print(f"[bold]{stage}[/bold]")
        results[stage] = run_in_process_of_its_own(stage, args.work, work, scale_name)
    ce, warm, cold, local = (
        results[s] for s in ("ce", "kd_warm_served", "kd_cold_ray_serve", "kd_in_process")
    )
    ratios = {
        "warm KD ÷ CE (s/step)": (warm.seconds / warm.optimizer_steps) / (ce.seconds / ce.optimizer_steps),
        "cold served ÷ in process (steps/s)": (cold.steps_per_second or 0) / (local.steps_per_second or 1),
    }
    report = {
        "scale": asdict(scale),
        "image_size": 224,
        "device": args.device,
        "teachers": list(TEACHER_ARCHITECTURES),
        "student": "resnet50_l1_pruned",
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "seconds": time.perf_counter() - started,
        "stages": {
            name: {**asdict(r), "steps_per_second": r.steps_per_second} for name, r in results.items()
        },
        "ratios": ratios,
    }
    (work / "rehearsal.json").write_text(json.dumps(report, indent=2))
    out = Console(width=150)
    out.print(table(results, f"seed-000 rehearsal at 224², {scale_name} scale, {args.device}"))
    out.print(ratio_table(ratios))
    if args.readme:
        write_into_readme(report, args.readme)
    console.print(f"written: {work / 'rehearsal.json'}")


if __name__ == "__main__":
    main()
