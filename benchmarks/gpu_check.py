"""The GPU questions, one section at a time (benchmarks/gpu_check.sh runs each under a timeout of its own).

- env: the card, its memory and driver, and the software versions.
- engine: the teacher engine's images/s for legacy_senet154 and resnet152 (bf16, channels_last, compiled) at
  batch 64 and 256, on the bare engine, through the gRPC teacher server in this process (`BackgroundServer`, a
  `TeacherClient` without a cache: every request computes) and through Ray Serve (the service's application);
  served ÷ bare per path; peak GPU memory.
The student and `ekd warm` questions (pruned ResNet-50 steps/s with CE and with warm KD from the bank, views/s
per GPU) are benchmarks/rehearsal.py's stages at the GPU scale, which the shell script runs.

`--cpu` asks the same questions at tiny sizes (fp32, no compile, 32x32 inputs, batch 4 and 8), so that the
script is known to run end to end where no GPU is.

    .venv/bin/python benchmarks/gpu_check.py --section env|engine [--cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

TEACHERS = ("legacy_senet154", "resnet152")
GPU_BATCHES = (64, 256)
CPU_BATCHES = (4, 8)
NUM_CLASSES = 1000
# How long each rate is timed: long enough on a GPU to reach steady state; short on the CPU check.
TIMED_SECONDS = {"gpu": 10.0, "cpu": 2.0}


def env_section(cpu: bool) -> dict:
    import grpc
    import ray
    import timm

    card = (
        {
            "name": torch.cuda.get_device_name(0),
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
            "count": torch.cuda.device_count(),
            "nvidia_smi": subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            ).stdout.strip(),
        }
        if torch.cuda.is_available()
        else None
    )
    return {
        "mode": "cpu" if cpu else "gpu",
        "card": card,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "timm": timm.__version__,
        "ray": ray.__version__,
        "grpcio": grpc.__version__,
    }


def images_per_second(call, batch: int, seconds: float) -> float:
    """Images/s of `call()` (one batch) over at least `seconds`, after two warm-up calls."""
    for _ in range(2):
        call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        done += batch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


def bare_and_grpc(engine, name: str, batches: tuple[int, ...], size: int, seconds: float) -> dict:
    """Images/s of `engine` alone and through the gRPC teacher server in this process, and its peak memory."""
    from services.rpc.backends import LocalBackend
    from services.rpc.client import TeacherClient
    from services.rpc.server import BackgroundServer

    results: dict = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with BackgroundServer(LocalBackend({name: engine})) as server, TeacherClient(server.address) as client:
        for batch in batches:
            images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
            bare = images_per_second(lambda: engine.infer(images, ["logits"]), batch, seconds)
            grpc_rate = images_per_second(lambda: client.fetch(images, [name], ["logits"]), batch, seconds)
            results[f"{name}/{batch}"] = {"bare": bare, "grpc": grpc_rate, "grpc_over_bare": grpc_rate / bare}
    results[f"{name}/peak_gpu_bytes"] = (
        torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    )
    return results


def engine_section(cpu: bool) -> dict:
    import ray
    import safetensors.torch

    from services.rpc.client import TeacherClient
    from services.serve.deployments import deploy
    from services.serve.serve_config import GrpcConfig, ServeConfig, TeacherDeploymentConfig
    from services.teachers.engine import TeacherEngine
    from services.teachers.spec import Preprocessing
    from services.teachers.zoo import create_teacher, save_teacher_checkpoint

    device = "cpu" if cpu else "cuda"
    options = {"precision": "fp32"} if cpu else {"precision": "bf16", "channels_last": True, "compile": True}
    batches = CPU_BATCHES if cpu else GPU_BATCHES
    size = 32 if cpu else 224
    preprocessing = Preprocessing(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if cpu else None
    seconds = TIMED_SECONDS["cpu" if cpu else "gpu"]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Random weights in a weights file, so a real identity. On the CPU check an ekd checkpoint carries the
        # tiny input size, so that the bare engine and the Serve replicas (which read it) resize alike.
        checkpoints = {}
        for name in TEACHERS:
            model = create_teacher(name, NUM_CLASSES).model
            if cpu:
                checkpoints[name] = Path(tmp) / f"{name}.pt"
                save_teacher_checkpoint(checkpoints[name], model, name, NUM_CLASSES, preprocessing)
            else:
                checkpoints[name] = Path(tmp) / f"{name}.safetensors"
                safetensors.torch.save_file(model.state_dict(), checkpoints[name])
        for name in TEACHERS:
            teacher = create_teacher(name, NUM_CLASSES, checkpoints[name])
            results.update(
                bare_and_grpc(TeacherEngine(teacher, device, **options), name, batches, size, seconds)
            )
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            teachers = [
                TeacherDeploymentConfig(
                    name=name,
                    architecture=name,
                    num_classes=NUM_CLASSES,
                    checkpoint=str(checkpoints[name]),
                    max_batch_size=max(batches),
                    batch_wait_timeout_s=0.0,
                    num_cpus=0.5,
                    num_gpus=0 if cpu else 1,
                    **options,
                )
                for name in TEACHERS
            ]
            address = deploy(ServeConfig(teachers=teachers, grpc=GrpcConfig(port=0)))
            with TeacherClient(address) as client:
                for name in TEACHERS:
                    for batch in batches:
                        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
                        rate = images_per_second(
                            lambda images=images, name=name: client.fetch(images, [name], ["logits"]),
                            batch,
                            seconds,
                        )
                        row = results[f"{name}/{batch}"]
                        row["ray_serve"] = rate
                        row["ray_serve_over_bare"] = rate / row["bare"]
        finally:
            ray.shutdown()
    return results


SECTIONS = {"env": env_section, "engine": engine_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=sorted(SECTIONS), required=True)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: the script's own check")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible; --cpu runs the tiny CPU mode")
    result = SECTIONS[args.section](args.cpu)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.section}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
