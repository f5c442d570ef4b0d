"""Serving throughput: teacher images/s through the service ÷ the same engine in-process, side by side.

In one run, for each batch size, one uint8 batch and one teacher (a checkpoint saved in a temporary folder, so
that its weights have a sha256 like a real one), logits only:
- (a) in-process: `TeacherEngine.infer`, the baseline;
- (b) Ray Serve: the real application (`services.deployments.deploy`: a `TeacherDeployment` with
  `@serve.batch` behind the `GrpcIngress`, the service's default batching), real gRPC over 127.0.0.1, no
  cache, so every request computes; one `TeacherClient` without a store;
- (c) the same over `BackgroundServer` + `LocalBackend` (no Ray), no cache;
- (d) the cache-hit path: a `TeacherClient` with an LMDB store that holds every output, so no request is sent.
Each path's figure is its fastest of interleaved rounds (benchmarks/_timing.py). The issue's goal is
(b) ÷ (a) ≥ 0.9 at batch ≥ 64. The clients ask for float32 logits, the engine's own dtype: random weights can
give logits beyond fp16's range (resnet152's do), and logits are small next to the images either way.

Both sides compute with `--threads` torch threads: the Ray replica is given that many CPUs, because Ray sets a
replica's thread count from its CPUs.

Run: .venv/bin/python benchmarks/serving.py [--batch-sizes 64 128] [--seconds 6] [--model cifar_resnet56]
                                            [--image-size N] [--threads 1]
     .venv/bin/python benchmarks/serving.py --full --threads 8   # resnet152, 224x224, 1000 classes
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch
from _timing import interleaved_rates  # benchmarks/ is the script's folder, first on sys.path
from ray import serve
from rich.console import Console
from rich.table import Table

from services.backends import LocalBackend
from services.cache import open_store
from services.client import TeacherClient
from services.deployments import deploy
from services.engine import TeacherEngine
from services.serve_config import CacheConfig, GrpcConfig, ServeConfig, TeacherDeploymentConfig
from services.server import BackgroundServer
from services.zoo import create_teacher, save_teacher_checkpoint

TEACHER = "teacher"  # the teacher's name on both services
OUTPUTS = ["logits"]
OUTPUT_DTYPE = "float32"
ROUNDS = 3
PATHS = {
    "in_process": "(a) in-process engine",
    "ray_serve": "(b) Ray Serve, no cache",
    "local_server": "(c) gRPC, no Ray, no cache",
    "cache_hits": "(d) client, LMDB all hits",
}


def saved_teacher(model: str, num_classes: int, directory: Path) -> Path:
    """A random-weight checkpoint of `model`: loaded from a file, the teacher has a weights sha256."""
    path = directory / f"{model}.pt"
    save_teacher_checkpoint(path, create_teacher(model, num_classes), model, num_classes)
    return path


def check_same_outputs(label: str, served: torch.Tensor, local: torch.Tensor) -> None:
    """Fail unless a path returns the in-process logits, to 2 % of the largest: it must time the same work
    (not bit for bit, since the service may batch the samples differently)."""
    scale = local.abs().max().item()
    if not torch.allclose(served, local, rtol=0.0, atol=0.02 * max(scale, 1.0)):
        raise RuntimeError(
            f"{label} returned other logits than the in-process engine: max difference "
            f"{(served - local).abs().max().item():.4g} (logits up to {scale:.4g})"
        )


def path_rates(
    engine: TeacherEngine, clients: dict[str, TeacherClient], images: torch.Tensor, seconds: float
) -> dict[str, float]:
    """Images per second of every path in `PATHS` on `images`: the engine in-process, the others through their
    client (`clients` by path)."""

    def logits(path: str) -> torch.Tensor:
        if path == "in_process":
            return engine.infer(images, OUTPUTS)["logits"]
        return clients[path].fetch(images, [TEACHER], OUTPUTS)[TEACHER]["logits"]

    reference = logits("in_process")
    for path in clients:  # the first fetch of (d) also fills its cache: the caching server stores the outputs
        check_same_outputs(PATHS[path], logits(path), reference)
    sent = clients["cache_hits"].stats.remote_samples
    batch_size = images.shape[0]
    rates = interleaved_rates(
        {path: (lambda path=path: (logits(path), batch_size)[1]) for path in PATHS}, seconds, ROUNDS
    )
    if clients["cache_hits"].stats.remote_samples != sent:
        raise RuntimeError("the cache-hit path sent samples to the service: it was not all hits")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet56", help="teacher architecture from the zoo")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the uint8 images (default: the model's input size)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--seconds",
        type=float,
        default=6.0,
        help=f"measuring time per path and batch size, over {ROUNDS} interleaved rounds",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="resnet152 at 224x224 with 1000 classes (GPU-oriented; slow on a CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps figures steady on a shared machine, where one busy core "
        "stalls every multi-threaded op",
    )
    args = parser.parse_args()
    model, image_size, num_classes = args.model, args.image_size, 10
    if args.full:
        model, image_size, num_classes = "resnet152", 224, 1000
    if min(args.batch_sizes) < 1:
        raise ValueError(f"batch sizes must be at least 1, got {args.batch_sizes}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    console = Console()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = saved_teacher(model, num_classes, Path(tmp))
        engine = TeacherEngine(create_teacher(model, num_classes, checkpoint), device)
        image_size = image_size or engine.spec.preprocessing.input_size
        backend = LocalBackend({TEACHER: engine})
        teacher_config = TeacherDeploymentConfig(
            name=TEACHER,
            architecture=model,
            num_classes=num_classes,
            checkpoint=str(checkpoint),
            num_cpus=args.threads,
        )
        store = open_store(f"lmdb://{tmp}/cache")
        # This benchmark's own single-process cluster: token authentication has nothing to protect.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=max(os.cpu_count() or 1, args.threads), include_dashboard=False, log_to_driver=False
        )
        try:
            ray_address = deploy(
                ServeConfig(teachers=[teacher_config], grpc=GrpcConfig(port=0), cache=CacheConfig())
            )
            with (
                BackgroundServer(backend) as local_server,
                BackgroundServer(backend, store=store) as caching_server,
                TeacherClient(ray_address, output_dtype=OUTPUT_DTYPE) as ray_client,
                TeacherClient(local_server.address, output_dtype=OUTPUT_DTYPE) as local_client,
                TeacherClient(
                    caching_server.address, store=store, output_dtype=OUTPUT_DTYPE
                ) as cached_client,
            ):
                clients = {"ray_serve": ray_client, "local_server": local_client, "cache_hits": cached_client}
                rates = {}
                # Timed from a worker thread, where the servers and the trainer's prefetching call from too:
                # glibc's allocator makes the same forward slower in the main thread (its heap returns freed
                # memory to the kernel, so every batch faults it back in), which would handicap (a) alone.
                with ThreadPoolExecutor(max_workers=1) as worker:
                    for batch_size in args.batch_sizes:
                        images = torch.randint(
                            0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8
                        )
                        rates[batch_size] = worker.submit(
                            path_rates, engine, clients, images, args.seconds
                        ).result()
        finally:
            serve.shutdown()
            ray.shutdown()
            store.close()

    batching = teacher_config.batching()
    table = Table(
        title=f"{model} at {image_size}x{image_size}, {num_classes} classes, logits, {device}, "
        f"{args.threads} torch threads; Ray Serve batching: up to {batching.max_batch_size} "
        f"samples, wait {batching.batch_wait_timeout_s * 1000:.0f} ms"
    )
    table.add_column("batch", justify="right")
    table.add_column("path")
    for column in ("images/s", "÷ in-process"):
        table.add_column(column, justify="right")
    for batch_size, by_path in rates.items():
        for path, label in PATHS.items():
            ratio = "" if path == "in_process" else f"{by_path[path] / by_path['in_process']:.2f}"
            images_per_second = f"{by_path[path]:,.0f}" if by_path[path] >= 100 else f"{by_path[path]:.3g}"
            table.add_row(str(batch_size), label, images_per_second, ratio)
    console.print(table)
    console.print(
        f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"({os.cpu_count()} CPUs); a load above the CPU count means other work shared them."
    )


if __name__ == "__main__":
    main()
