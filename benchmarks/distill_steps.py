"""Distillation training speed: steps/s of the real epoch loop (`trainer.runs.loop.train_epoch`) per teacher
source, measured side by side in one run.

One student (cifar_resnet8), the same digits batches (16x16 uint8, batch 64, replayed views), and for
distillation Hinton KD from a 2-teacher ensemble (cifar_resnet56 + cifar_wrn16_4):
- CE: the student trained on labels alone, the ceiling for any distillation step;
- in-process: KD with `InProcessTeacherSource` (the teachers run in the training process);
- served: KD with `ServedTeacherSource` over `BackgroundServer` + `LocalBackend` (real gRPC on 127.0.0.1)
  and an LMDB cache the server writes. A fresh, empty cache per run: epoch 0 is cold (every output computed
  by the service); the epochs after it are warm: with one replayed view (views=1) every epoch shows the same
  bytes as epoch 0, so every teacher output is a cache hit (checked, and shown in the `cache hits` column);
each teacher source with `prefetch_batches` 0 and 2. CE is timed over the warm epochs and in-process over
epoch 0, the same batches as the served epochs they are compared with. Ratios: warm served ÷ CE (the
goal: ≥ 0.95) and cold served ÷ in-process, at the same prefetch depth. The stall fraction is
`stall_seconds / seconds` of the timed epochs (`EpochStats`): the share of the epoch the student waited for
teacher outputs.

Every configuration runs once per round, rounds interleaved; its figure is its fastest round.

Run: .venv/bin/python benchmarks/distill_steps.py [--warm-epochs 2] [--rounds 3] [--batch-size 64]
                                                  [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from services.cache import open_store
from services.rpc.backends import LocalBackend
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.zoo import create_teacher, save_teacher_checkpoint
from trainer.config import OptimConfig
from trainer.data import DatasetSplits, PadCrop, ReplayedViews, load_dataset
from trainer.methods import create_method
from trainer.methods.ce import CEParams
from trainer.methods.kd import KDParams
from trainer.runs.loop import (
    StudentTraining,
    make_optimizer,
    make_scheduler,
    resolve_device,
    train_epoch,
    train_loader,
)
from trainer.runs.sources import InProcessTeacherSource, ServedTeacherSource, TeacherSource
from trainer.runs.teachers import dataset_preprocessing
from trainer.students import StudentConfig

TEACHERS = ("cifar_resnet56", "cifar_wrn16_4")
TRAINED_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints" / "digits"
STUDENT = StudentConfig(arch="cifar_resnet8")
IMAGE_SIZE = 16
SEED = 0
LR = 0.05
PREFETCH_DEPTHS = (0, 2)
COLD_EPOCHS = range(0, 1)  # with one replayed view, epoch 0 fills the cache and every later epoch hits it


@dataclass(frozen=True)
class Timed:
    """Training steps over some epochs: their time, the student's wait for teacher outputs, and cache use."""

    steps: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0
    cache_hits: int = 0
    cache_lookups: int = 0

    def __add__(self, other: Timed) -> Timed:
        return Timed(*(getattr(self, name) + getattr(other, name) for name in Timed.__dataclass_fields__))

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds

    @property
    def stall_fraction(self) -> float:
        return self.stall_seconds / self.seconds


@dataclass(frozen=True)
class Bench:
    """What every configuration shares: data, views, batch size, device."""

    splits: DatasetSplits
    views: ReplayedViews
    batch_size: int
    device: torch.device

    def train(
        self, params: CEParams | KDParams, source: TeacherSource | None, epochs: int, prefetch: int
    ) -> list[Timed]:
        """Train a freshly seeded student for `epochs` epochs with `train_epoch`; one `Timed` per epoch."""
        torch.manual_seed(SEED)
        teachers = source.describe(self.splits.image_size) if source is not None else []
        method = create_method(
            params, num_classes=self.splits.num_classes, in_chans=self.splits.in_chans, teachers=teachers
        ).to(self.device)
        optim = OptimConfig(epochs=epochs, lr=LR)
        optimizer = make_optimizer(method.param_groups(optim.lr), optim)
        steps_per_epoch = len(train_loader(self.views, self.batch_size, SEED, 0))
        scheduler = make_scheduler(optimizer, optim, epochs * steps_per_epoch)
        timed = []
        for epoch in range(epochs):
            before = source.counters() if source is not None else {}
            training = StudentTraining(
                method, optimizer, scheduler, self.device, self.splits.mean, self.splits.std
            )
            stats = train_epoch(
                training,
                train_loader(self.views, self.batch_size, SEED, epoch),
                source,
                epoch=epoch,
                total_epochs=epochs,
                prefetch_batches=prefetch,
            )
            after = source.counters() if source is not None else {}
            hits, misses = (
                after.get(name, 0) - before.get(name, 0) for name in ("cache_hits", "cache_misses")
            )
            timed.append(Timed(steps_per_epoch, stats.seconds, stats.stall_seconds, hits, hits + misses))
        return timed


def over(timed: list[Timed], epochs: Sequence[int]) -> Timed:
    """The per-epoch figures of `epochs`, added up."""
    return sum((timed[epoch] for epoch in epochs), Timed())


def teacher_checkpoints(splits: DatasetSplits, directory: Path) -> tuple[list[Path], str]:
    """The trained digits teachers when both exist, else random-weight checkpoints saved in `directory` (speed
    does not depend on the weights); and a note saying which."""
    trained = [TRAINED_CHECKPOINTS / f"{name}.pt" for name in TEACHERS]
    if all(path.is_file() for path in trained):
        return trained, f"trained checkpoints from {TRAINED_CHECKPOINTS}"
    saved = []
    for name in TEACHERS:
        path = directory / f"{name}.pt"
        teacher = create_teacher(name, splits.num_classes, preprocessing=dataset_preprocessing(splits))
        save_teacher_checkpoint(path, teacher, name, splits.num_classes, teacher.spec.preprocessing)
        saved.append(path)
    return saved, f"random-weight checkpoints ({TRAINED_CHECKPOINTS} lacks {', '.join(TEACHERS)})"


def served_run(
    bench: Bench, backend: LocalBackend, identities: list[str], cache_uri: str, epochs: int, prefetch: int
) -> list[Timed]:
    """KD from the served teachers, starting with an empty cache at `cache_uri`."""
    store = open_store(cache_uri)
    try:
        with BackgroundServer(backend, store=store) as server:
            source = ServedTeacherSource(
                server.address, list(backend.specs()), cache_uri=cache_uri, expected_identities=identities
            )
            try:
                return bench.train(KDParams(student=STUDENT), source, epochs, prefetch)
            finally:
                source.close()
    finally:
        store.close()  # after the server stopped: it writes every output it computes


def measure(bench: Bench, checkpoints: list[Path], warm_epochs: range, rounds: int) -> dict[str, Timed]:
    """The fastest round of every configuration, by name: "ce", and "in_process/P", "cold/P", "warm/P" for
    each prefetch depth P."""
    num_classes, device = bench.splits.num_classes, bench.device
    teachers = [create_teacher(name, num_classes, path) for name, path in zip(TEACHERS, checkpoints)]
    in_process = InProcessTeacherSource(teachers, device)
    backend = LocalBackend(
        {
            name: TeacherEngine(create_teacher(name, num_classes, path), device)
            for name, path in zip(TEACHERS, checkpoints)
        }
    )
    identities = [teacher.spec.identity for teacher in teachers]
    best: dict[str, Timed] = {}

    def keep_fastest(name: str, timed: Timed) -> None:
        if name not in best or timed.steps_per_second > best[name].steps_per_second:
            best[name] = timed

    with tempfile.TemporaryDirectory() as caches:
        for round_index in range(rounds):
            timed = bench.train(CEParams(student=STUDENT), None, warm_epochs.stop, 0)
            keep_fastest("ce", over(timed, warm_epochs))
            for prefetch in PREFETCH_DEPTHS:
                timed = bench.train(KDParams(student=STUDENT), in_process, COLD_EPOCHS.stop, prefetch)
                keep_fastest(f"in_process/{prefetch}", over(timed, COLD_EPOCHS))
                cache_uri = f"lmdb://{caches}/round{round_index}-prefetch{prefetch}"
                timed = served_run(bench, backend, identities, cache_uri, warm_epochs.stop, prefetch)
                warm = over(timed, warm_epochs)
                if warm.cache_hits != warm.cache_lookups:
                    missed = warm.cache_lookups - warm.cache_hits
                    raise RuntimeError(
                        f"warm epochs {list(warm_epochs)} missed the cache {missed} times: "
                        "they were not all hits"
                    )
                keep_fastest(f"cold/{prefetch}", over(timed, COLD_EPOCHS))
                keep_fastest(f"warm/{prefetch}", warm)
            print(f"round {round_index + 1}/{rounds} done", flush=True)
    return best


def epochs_label(epochs: range) -> str:
    return str(epochs.start) if len(epochs) == 1 else f"{epochs.start}-{epochs[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-epochs", type=int, default=2, help="epochs timed after the cold one")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; each figure is the fastest"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps figures steady on a shared machine, where one busy core "
        "stalls every multi-threaded op",
    )
    args = parser.parse_args()
    for name in ("warm_epochs", "rounds", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    console = Console()
    device = resolve_device("auto")
    splits = load_dataset("digits", image_size=IMAGE_SIZE, seed=SEED)
    views = ReplayedViews(splits.train, seed=SEED, views=1, maker=PadCrop(2, False))
    bench = Bench(splits, views, args.batch_size, device)
    warm_epochs = range(COLD_EPOCHS.stop, COLD_EPOCHS.stop + args.warm_epochs)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints, teachers_note = teacher_checkpoints(splits, Path(tmp))
        best = measure(bench, checkpoints, warm_epochs, args.rounds)

    table = Table(
        title=f"{STUDENT.arch} student, digits {IMAGE_SIZE}x{IMAGE_SIZE}, batch {args.batch_size}, "
        f"{device}, {args.threads} torch threads; KD teachers {' + '.join(TEACHERS)}"
    )
    table.add_column("configuration")
    for column in ("prefetch", "epochs", "steps/s", "stall", "cache hits"):
        table.add_column(column, justify="right")
    rows = [("CE, no teachers", "ce", "-", warm_epochs)]
    for prefetch in PREFETCH_DEPTHS:
        rows += [
            ("KD, in-process teachers", f"in_process/{prefetch}", str(prefetch), COLD_EPOCHS),
            ("KD, served, cold", f"cold/{prefetch}", str(prefetch), COLD_EPOCHS),
            ("KD, served, warm", f"warm/{prefetch}", str(prefetch), warm_epochs),
        ]
    for label, name, prefetch, epochs in rows:
        timed = best[name]
        hits = f"{timed.cache_hits / timed.cache_lookups:.0%}" if timed.cache_lookups else "-"
        table.add_row(
            label,
            prefetch,
            epochs_label(epochs),
            f"{timed.steps_per_second:.2f}",
            f"{timed.stall_fraction:.0%}",
            hits,
        )
    console.print(table)

    def ratio(numerator: str, denominator: str) -> str:
        return f"{best[numerator].steps_per_second / best[denominator].steps_per_second:.2f}"

    ratios = Table(title="ratios of steps/s")
    ratios.add_column("ratio")
    for prefetch in PREFETCH_DEPTHS:
        ratios.add_column(f"prefetch {prefetch}", justify="right")
    ratios.add_row("warm served ÷ CE (goal ≥ 0.95)", *(ratio(f"warm/{p}", "ce") for p in PREFETCH_DEPTHS))
    ratios.add_row(
        "cold served ÷ in-process", *(ratio(f"cold/{p}", f"in_process/{p}") for p in PREFETCH_DEPTHS)
    )
    console.print(ratios)
    console.print(f"teachers: {teachers_note}")
    console.print(
        f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"({os.cpu_count()} CPUs); a load above the CPU count means other work shared them."
    )


if __name__ == "__main__":
    main()
