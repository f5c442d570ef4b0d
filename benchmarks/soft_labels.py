"""The compact soft-label form against full logits, in one run:

1. bytes per view of each form: the value, its key, and what LMDB and Redis take per entry (measured: LMDB's
   pages in use, Redis's used_memory, over N entries);
2. the KD loss T²·KL(p_t^T ‖ p_s^T) and its gradient w.r.t. the student logits, from the compact form
   against full logits, relative error at T ∈ {1, 2, 4, 10} (and at temperatures between the stored ones) on
   long-tailed 1000-class logits: a few dominant classes over a heavy-tailed (Student-t) bulk, the student's
   logits correlated with the teacher's; beside it the uniform tail (FKD's smoothing) and larger top-k;
3. digits (configs/digits/kd.yaml, in-process teachers): student test accuracy with full vs compact teacher
   outputs, 3 seeds.

Beside them the quantized form (services/formats/quantized_logits.py), every class's gap below the top in
7 to 12 bits.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soft_labels.py [--entries 20000] [--seeds 0,1,2]
    [--sections bytes,errors,digits]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lmdb
import redis
import torch
from rich.console import Console
from rich.table import Table

from services.cache import input_digests, open_store, output_key
from services.cache.local_redis import running_redis_server
from services.formats.codec import encode_value
from services.formats.quantized_logits import frame_bytes as quantized_frame_bytes
from services.formats.quantized_logits import quantized
from services.formats.soft_labels import CompactLogits, compress, encode, frame_bytes
from trainer.config import load_experiment
from trainer.methods.losses import distillation_kl, soft_targets
from trainer.runs.run import run_experiment

CLASSES = 1000
TEMPERATURES = (1.0, 2.0, 4.0, 10.0)
BETWEEN = (1.5, 3.0, 6.0)
IDENTITY = "0aa4803b1e00" + "0" * 52


def long_tailed_logits(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) logits [batch, 1000]: a heavy-tailed bulk (Student-t, 4 degrees of freedom, scale
    1.6), one dominant class 8-14 above it and three related classes 2-7 above it; the student is 0.8 × the
    teacher plus unit Gaussian noise (correlation about 0.9 over the bulk)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # StudentT samples from the global generator
    bulk = torch.distributions.StudentT(4.0).sample((batch, CLASSES)) * 1.6
    teacher = bulk.clone()
    rows = torch.arange(batch)
    teacher[rows, torch.randint(0, CLASSES, (batch,), generator=generator)] += 8 + 6 * torch.rand(
        batch, generator=generator
    )
    for _ in range(3):
        teacher[rows, torch.randint(0, CLASSES, (batch,), generator=generator)] += 2 + 5 * torch.rand(
            batch, generator=generator
        )
    student = 0.8 * teacher + torch.randn(batch, CLASSES, generator=generator)
    return teacher, student


def kd_loss_and_gradient(student: torch.Tensor, teacher, temperature: float, uniform_tail: bool = False):
    logits = student.clone().requires_grad_(True)
    if uniform_tail:  # the tail's exact mass spread evenly over its classes, as FKD's marginal smoothing does
        target = teacher.target_probs(temperature, torch.zeros_like(student))
    else:
        target = soft_targets([teacher], temperature, student_logits=logits)
    loss = distillation_kl(logits, target, temperature)
    loss.backward()
    return loss.item(), logits.grad


def error_rows(batch: int) -> list[list[str]]:
    teacher, student = long_tailed_logits(batch)
    forms = {
        f"compact (k = 16, {frame_bytes(CLASSES, 16)} B), student-shaped tail": (compress(teacher), False),
        f"compact (k = 16, {frame_bytes(CLASSES, 16)} B), uniform tail": (compress(teacher), True),
        f"top-64 + tail ({frame_bytes(CLASSES, 64)} B)": (compress(teacher, 64), False),
        f"top-255 + tail ({frame_bytes(CLASSES, 255)} B)": (compress(teacher, 255), False),
        f"quantized ({quantized_frame_bytes(CLASSES):,} B)": (quantized(teacher), False),
        "fp16 logits (2,027 B)": (teacher.half().float(), False),
    }
    rows = []
    for temperature in (*TEMPERATURES, *BETWEEN):
        full_loss, full_gradient = kd_loss_and_gradient(student, teacher, temperature)
        cells = [f"{temperature:g}", f"{full_loss:.4f}"]
        for form, uniform in forms.values():
            loss, gradient = kd_loss_and_gradient(student, form, temperature, uniform)
            loss_error = abs(loss - full_loss) / full_loss
            gradient_error = ((gradient - full_gradient).norm() / full_gradient.norm()).item()
            cells.append(f"{100 * loss_error:.2f} / {100 * gradient_error:.2f}")
        rows.append(cells)
    return [["T", "full loss", *forms]] + rows


def backend_bytes(entries: int) -> list[list[str]]:
    teacher, _ = long_tailed_logits(entries, seed=1)
    images = torch.randint(
        0, 256, (entries, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    digests = input_digests(images)
    compact = compress(teacher)
    forms = {
        "fp32 logits": ("float32", "full", lambda i: teacher[i]),
        "fp16 logits (served default)": ("float16", "full", lambda i: teacher[i].half()),
        "compact": ("float16", "compact", lambda i: compact[i]),
    }
    rows = []
    with (
        tempfile.TemporaryDirectory() as directory,
        running_redis_server(Path(directory) / "redis") as server,
    ):
        client = redis.Redis.from_url(server.url)
        for n, (label, (dtype, form, value)) in enumerate(forms.items()):
            keys = [output_key(IDENTITY, "logits", dtype, 0, digest, form=form) for digest in digests]
            sample = value(0)
            value_bytes = (
                len(encode(sample)[0]) if isinstance(sample, CompactLogits) else len(encode_value(sample))
            )
            path = Path(directory) / f"lmdb-{n}"
            with open_store(str(path)) as store:
                for start in range(0, entries, 1000):
                    store.put_many([(keys[i], value(i)) for i in range(start, min(start + 1000, entries))])
            with lmdb.open(str(path), readonly=True, lock=False) as env:
                info, stat = env.info(), env.stat()
                lmdb_per_entry = (info["last_pgno"] + 1) * stat["psize"] / entries
            client.flushdb()
            before = client.info("memory")["used_memory"]
            with open_store(server.url) as store:
                for start in range(0, entries, 1000):
                    store.put_many([(keys[i], value(i)) for i in range(start, min(start + 1000, entries))])
            redis_per_entry = (client.info("memory")["used_memory"] - before) / entries
            rows.append(
                [
                    label,
                    str(value_bytes),
                    str(len(keys[0])),
                    f"{lmdb_per_entry:,.0f}",
                    f"{redis_per_entry:,.0f}",
                ]
            )
        client.close()
    return [["form", "value B", "key B", "LMDB B/entry", "Redis B/entry"]] + rows


def digits_rows(seeds: list[int], epochs: int | None) -> list[list[str]]:
    rows = []
    accuracies: dict[str, list[float]] = {"full": [], "compact": []}
    for seed in seeds:
        for form in accuracies:
            overrides = [
                f"seed={seed}",
                f"teacher_source.soft_labels={form}",
                "output_dir=/tmp/ekd-soft-labels",
            ]
            if epochs is not None:
                overrides.append(f"train.epochs={epochs}")
            result = run_experiment(load_experiment("configs/digits/kd.yaml", overrides))
            accuracies[form].append(100 * result.test_accuracy)
        rows.append([str(seed), f"{accuracies['full'][-1]:.2f}", f"{accuracies['compact'][-1]:.2f}"])
    mean = {form: sum(values) / len(values) for form, values in accuracies.items()}
    rows.append(["mean", f"{mean['full']:.2f}", f"{mean['compact']:.2f}"])
    return [["seed", "full (%)", "compact (%)"]] + rows


def show(console: Console, title: str, rows: list[list[str]]) -> None:
    table = Table(title=title)
    for n, header in enumerate(rows[0]):
        table.add_column(header, justify="left" if n == 0 else "right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=20_000, help="entries written per form and backend")
    parser.add_argument(
        "--batch", type=int, default=512, help="views of long-tailed logits for the KD errors"
    )
    parser.add_argument("--seeds", default="0,1,2", help="digits seeds")
    parser.add_argument("--epochs", type=int, default=None, help="digits epochs (default: the config's)")
    parser.add_argument("--sections", default="bytes,errors,digits", help="which of bytes, errors, digits")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    console = Console(width=200)
    if "bytes" in sections:
        title = f"bytes per view ({CLASSES} classes, {args.entries:,} entries)"
        show(console, title, backend_bytes(args.entries))
    if "errors" in sections:
        title = "KD loss / gradient relative error (%) against full fp32 logits"
        show(console, title, error_rows(args.batch))
    if "digits" in sections:
        seeds = [int(seed) for seed in args.seeds.split(",")]
        title = "digits kd (cifar_resnet56 -> cifar_resnet8): test accuracy"
        show(console, title, digits_rows(seeds, args.epochs))


if __name__ == "__main__":
    main()
