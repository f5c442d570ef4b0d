"""Serving throughput: teacher images/s through the service ÷ the same engine in-process, side by side.

In one run, for each batch size, one uint8 batch and one teacher (a checkpoint saved in a temporary folder, so
that its weights have a sha256 like a real one), logits only:
- (a) in-process: `TeacherEngine.infer`, the baseline;
- (b) Ray Serve: the real application (`services.serve.deployments.deploy`: a `TeacherDeployment` with
  `@serve.batch` behind the `GrpcIngress`, the service's default batching), real gRPC over 127.0.0.1, no
  cache, so every request computes; one `TeacherClient` without a store;
- (c) the same over `BackgroundServer` + `LocalBackend` (no Ray), no cache;
- (d) the cache-hit path: a `TeacherClient` with an LMDB store that holds every output, so no request is sent.
Each path's figure is its fastest of interleaved rounds (benchmarks/_timing.py). The goal is
(b) ÷ (a) ≥ 0.9 at batch ≥ 64. The clients ask for float32 logits, the engine's own dtype: random weights can
give logits beyond fp16's range (resnet152's do), and logits are small next to the images either way.

Both sides compute with `--threads` torch threads: the Ray replica is given that many CPUs, because Ray sets a
replica's thread count from its CPUs.

`--transport` measures the transport pair instead, where compute hides nothing: the near-zero compute
teacher `benchmark_pool_linear` (registered by this benchmark, in its own processes and Ray's) at 224x224
(150,528 bytes per image, 1000 classes, float16 logits on the wire, no cache), requests of 64 and 256 images:
- (e) in-process engine: the engine's own work for the batch;
- (r) raw gRPC echo between two processes: a grpc.aio server (like the service's) whose one method takes the
  image bytes (no protobuf, no tensors) and answers as many bytes as the service's logits reply;
- (s) the teacher server (`BackgroundServer` + `LocalBackend`) in a process of its own, one `TeacherClient`;
- (s') the Ray Serve application (ingress and teacher replicas are processes of their own), batching up to
  the largest request with no wait, so that each request is one forward like (e).
"Serving adds" is the input MB of a request over (its served time - (e)'s time for the same batch): what
serving costs beyond the engine's work, which a GPU spends on the device. The goal: (s) at least half of
(r)'s input MB/s.

Run: .venv/bin/python benchmarks/serving.py [--batch-sizes 64 128] [--seconds 6] [--model cifar_resnet56]
                                            [--image-size N] [--threads 1]
     .venv/bin/python benchmarks/serving.py --full --threads 8   # resnet152, 224x224, 1000 classes
     .venv/bin/python benchmarks/serving.py --transport [--batch-sizes 64 256] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import grpc
import ray
import torch
from _timing import interleaved_rates  # benchmarks/ is the script's folder, first on sys.path
from ray import serve
from rich.console import Console
from rich.table import Table
from torch import nn

from services.cache import open_store
from services.core.contract import DEFAULT_MAX_MESSAGE_BYTES
from services.rpc.backends import LocalBackend
from services.rpc.client import TeacherClient
from services.rpc.server import BackgroundServer
from services.serve.deployments import deploy
from services.serve.serve_config import CacheConfig, GrpcConfig, ServeConfig, TeacherDeploymentConfig
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import TEACHERS, create_teacher, register_teacher, save_teacher_checkpoint

TEACHER = "teacher"  # the teacher's name on both services
OUTPUTS = ["logits"]
OUTPUT_DTYPE = "float32"
ROUNDS = 3
# The transport figure is a difference of two timings (served - engine), so it takes each one's least
# disturbed round out of more of them.
TRANSPORT_ROUNDS = 5
TRANSPORT_TEACHER = "benchmark_pool_linear"


def benchmark_pool_linear(num_classes: int, in_chans: int) -> nn.Module:
    """Near-zero compute (a mean over each channel and a linear layer), so that the served path at ImageNet
    size measures the transport, not the model."""
    return nn.Sequential(
        OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(in_chans, num_classes))
    )


def register_transport_teacher() -> None:
    """Registers `benchmark_pool_linear` in this process: at import here and in spawned children, and as the
    setup hook of Ray's workers (the Serve replicas build it by name)."""
    if TRANSPORT_TEACHER not in TEACHERS:
        register_teacher(preprocessing=Preprocessing.imagenet(), taps={"pool": "pool"})(benchmark_pool_linear)


register_transport_teacher()
TRANSPORT_CLASSES = 1000
TRANSPORT_IMAGE_SIZE = 224
RAW_ECHO_SERVICE = "ekd.benchmark.RawEcho"
RAW_ECHO_METHOD = "Echo"
TRANSPORT_PATHS = {
    "engine": "(e) in-process engine",
    "raw_grpc": "(r) raw gRPC echo, two processes",
    "served": "(s) gRPC server in its own process, no cache",
    "ray_serve": "(s') Ray Serve application, no cache",
}
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet56", help="teacher architecture from the zoo")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the uint8 images (default: the model's input size)",
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="default 64 128 (--transport: 64 256)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=6.0,
        help=f"measuring time per path and batch size, over {ROUNDS} interleaved rounds "
        f"({TRANSPORT_ROUNDS} with --transport)",
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
    parser.add_argument(
        "--transport",
        action="store_true",
        help=f"the transport pair instead: {TRANSPORT_TEACHER} at 224x224 served from its own process, "
        "beside a raw gRPC echo of the same bytes (default batch sizes 64 256)",
    )
    return parser.parse_args()


def compute_bound(args: argparse.Namespace) -> None:
    """Paths (a)-(d): a real teacher, where compute dominates."""
    model, image_size, num_classes = args.model, args.image_size, 10
    if args.full:
        model, image_size, num_classes = "resnet152", 224, 1000
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
                    for batch_size in args.batch_sizes or [64, 128]:
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


# ---- the transport pair ----------------------------------------------------------------------------------


def image_bytes(images: torch.Tensor) -> int:
    return images.numel() * images.element_size()


def echo_reply_bytes(request_bytes: int) -> int:
    """What the raw echo answers a request of `request_bytes`: as many bytes as the service's reply, one
    float16 logits row per 3x224x224 image."""
    return request_bytes // (3 * TRANSPORT_IMAGE_SIZE**2) * TRANSPORT_CLASSES * 2


def run_teacher_server(checkpoint: str, threads: int, ready: Queue, stop: Event) -> None:
    """Child process: the teacher server (`BackgroundServer` + `LocalBackend`, no cache) until `stop`."""
    torch.set_num_threads(threads)
    engine = TeacherEngine(create_teacher(TRANSPORT_TEACHER, TRANSPORT_CLASSES, checkpoint))
    with BackgroundServer(LocalBackend({TEACHER: engine})) as server:
        ready.put(server.address)
        stop.wait()


def run_raw_echo_server(ready: Queue, stop: Event) -> None:
    """Child process: a grpc.aio server (like the service's) whose one method takes raw bytes and streams back
    one message of `echo_reply_bytes`: gRPC alone, no protobuf, no tensors."""

    async def serve() -> None:
        replies: dict[int, bytes] = {}

        async def echo(request: bytes, context: grpc.aio.ServicerContext):
            size = echo_reply_bytes(len(request))
            yield replies.setdefault(size, bytes(size))

        server = grpc.aio.server(options=message_limits())
        handler = grpc.unary_stream_rpc_method_handler(echo)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(RAW_ECHO_SERVICE, {RAW_ECHO_METHOD: handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(f"127.0.0.1:{port}")
        await asyncio.to_thread(stop.wait)
        await server.stop(None)

    asyncio.run(serve())


def message_limits() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ]


@contextlib.contextmanager
def child_server(target, *args) -> Iterator[str]:
    """Run `target(*args, ready, stop)` in a process of its own; yield the address it reports."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Queue(), context.Event()
    process = context.Process(target=target, args=(*args, ready, stop), daemon=True)
    process.start()
    try:
        yield ready.get(timeout=120)
    finally:
        stop.set()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def transport_rates(
    engine: TeacherEngine,
    raw_address: str,
    clients: dict[str, TeacherClient],
    images: torch.Tensor,
    seconds: float,
) -> dict[str, float]:
    """Images per second of every path in `TRANSPORT_PATHS` on `images`."""
    batch_size = images.shape[0]
    payload = images.numpy().tobytes()
    with grpc.insecure_channel(raw_address, options=message_limits()) as channel:
        echo = channel.unary_stream(f"/{RAW_ECHO_SERVICE}/{RAW_ECHO_METHOD}")

        def raw() -> int:
            received = sum(len(reply) for reply in echo(payload, timeout=60))
            if received != echo_reply_bytes(len(payload)):
                raise RuntimeError(f"the raw echo answered {received} bytes")
            return batch_size

        def engine_logits() -> torch.Tensor:
            return engine.infer(images, OUTPUTS)["logits"]

        def fetched(path: str) -> torch.Tensor:
            return clients[path].fetch(images, [TEACHER], OUTPUTS)[TEACHER]["logits"]

        reference = engine_logits()
        for path in clients:
            check_same_outputs(TRANSPORT_PATHS[path], fetched(path), reference)
        work = {"engine": lambda: (engine_logits(), batch_size)[1], "raw_grpc": raw}
        work.update({path: (lambda path=path: (fetched(path), batch_size)[1]) for path in clients})
        return interleaved_rates(work, seconds, TRANSPORT_ROUNDS)


def transport(args: argparse.Namespace) -> None:
    """The transport pair: what serving adds per image beyond the engine's work, beside raw gRPC."""
    console = Console()
    load_before = os.getloadavg()[0]
    batch_sizes = args.batch_sizes or [64, 256]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = saved_teacher(TRANSPORT_TEACHER, TRANSPORT_CLASSES, Path(tmp))
        engine = TeacherEngine(create_teacher(TRANSPORT_TEACHER, TRANSPORT_CLASSES, checkpoint))
        teacher_config = TeacherDeploymentConfig(
            name=TEACHER,
            architecture=TRANSPORT_TEACHER,
            num_classes=TRANSPORT_CLASSES,
            checkpoint=str(checkpoint),
            num_cpus=args.threads,
            # One request at a time: the whole request is one forward, as in (e), and no wait for others.
            max_batch_size=max(batch_sizes),
            batch_wait_timeout_s=0.0,
        )
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=max(os.cpu_count() or 1, args.threads),
            include_dashboard=False,
            log_to_driver=False,
            # Ray's workers import this benchmark to register the transport teacher before they build it.
            runtime_env={
                "env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)},
                "worker_process_setup_hook": "serving.register_transport_teacher",
            },
        )
        try:
            ray_address = deploy(ServeConfig(teachers=[teacher_config], grpc=GrpcConfig(port=0)))
            with (
                child_server(run_teacher_server, str(checkpoint), args.threads) as served_address,
                child_server(run_raw_echo_server) as raw_address,
                TeacherClient(served_address) as served_client,
                TeacherClient(ray_address) as ray_client,
                ThreadPoolExecutor(max_workers=1) as worker,  # see compute_bound
            ):
                clients = {"served": served_client, "ray_serve": ray_client}
                rates = {}
                for batch_size in batch_sizes:
                    images = torch.randint(
                        0, 256, (batch_size, 3, TRANSPORT_IMAGE_SIZE, TRANSPORT_IMAGE_SIZE), dtype=torch.uint8
                    )
                    rates[batch_size] = worker.submit(
                        transport_rates, engine, raw_address, clients, images, args.seconds
                    ).result()
        finally:
            serve.shutdown()
            ray.shutdown()

    table = Table(
        title=f"transport: {TRANSPORT_TEACHER} at {TRANSPORT_IMAGE_SIZE}x{TRANSPORT_IMAGE_SIZE} "
        f"({3 * TRANSPORT_IMAGE_SIZE**2:,} bytes per image), {TRANSPORT_CLASSES} classes, float16 logits, "
        f"cpu, {args.threads} torch threads"
    )
    table.add_column("batch", justify="right")
    table.add_column("path")
    for column in ("images/s", "ms per request", "input MB/s", "serving adds: MB/s", "÷ raw gRPC"):
        table.add_column(column, justify="right")
    for batch_size, by_path in rates.items():
        megabytes = batch_size * 3 * TRANSPORT_IMAGE_SIZE**2 / 1e6
        raw_rate = by_path["raw_grpc"] / batch_size * megabytes
        engine_seconds = batch_size / by_path["engine"]
        for path, label in TRANSPORT_PATHS.items():
            seconds = batch_size / by_path[path]
            added, ratio = "", ""
            if path in ("served", "ray_serve"):
                overhead = megabytes / (seconds - engine_seconds)
                added, ratio = f"{overhead:,.0f}", f"{overhead / raw_rate:.2f}"
            table.add_row(
                str(batch_size),
                label,
                f"{by_path[path]:,.0f}",
                f"{seconds * 1000:.1f}",
                f"{megabytes / seconds:,.0f}",
                added,
                ratio,
            )
    console.print(table)
    console.print(
        "serving adds: input MB per (a request's time - the engine's time for the same batch); "
        "÷ raw gRPC: that, over raw gRPC's input MB/s. "
        f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"({os.cpu_count()} CPUs)."
    )


def main() -> None:
    args = parse_args()
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        raise ValueError(f"batch sizes must be at least 1, got {args.batch_sizes}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.transport:
        transport(args)
    else:
        compute_bound(args)


if __name__ == "__main__":
    main()
