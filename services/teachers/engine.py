"""Batched teacher forward: uint8 images in, logits and named feature taps out (float32, CPU).

Preprocessing follows the teacher's `Preprocessing`: scale to [0, 1], resize to the model's input size when
the images differ, normalise per channel. Feature taps are read with forward hooks on the named submodules, so
the model code stays unchanged and only requested taps are kept. On CUDA the input goes through a pinned host
buffer with a non-blocking copy, convolutions run channels_last (unless `channels_last=False`), and precision
"auto" means bf16 autocast.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from services.core.contract import LOGITS
from services.teachers.spec import Teacher, TeacherSpec

PRECISIONS = ("auto", "fp32", "bf16")


class InputSpecError(ValueError):
    """Images that do not match what the engine accepts (dtype, rank, channels, batch size)."""


class UnknownOutputError(ValueError):
    """An output name the teacher does not provide."""


class TeacherEngine:
    """Runs one teacher's forward on batches of uint8 images and returns the requested outputs."""

    def __init__(
        self,
        teacher: Teacher,
        device: str | torch.device = "cpu",
        *,
        precision: str = "auto",
        compile: bool = False,
        channels_last: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        self.teacher = teacher
        self.precision = precision
        on_cuda = self.device.type == "cuda"
        self._bf16 = precision == "bf16" or (precision == "auto" and on_cuda)
        # channels_last is a layout choice, not a precision one: on CUDA it is the faster one for convs.
        self._memory_format = torch.channels_last if on_cuda and channels_last else torch.contiguous_format
        # Two documented calls (device, then layout): Module.to has no overload that takes both.
        self.model = teacher.model.to(self.device).to(memory_format=self._memory_format).eval()
        preprocessing = teacher.spec.preprocessing
        shape = (1, preprocessing.in_chans, 1, 1)
        self._mean = torch.tensor(preprocessing.mean, device=self.device).view(shape)
        self._std = torch.tensor(preprocessing.std, device=self.device).view(shape)
        self._recording: frozenset[str] = frozenset()
        self._captured: dict[str, torch.Tensor] = {}
        for tap, module_path in teacher.spec.taps.items():
            self.model.get_submodule(module_path).register_forward_hook(self._tap_hook(tap))
        self._forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model) if compile else self.model
        )
        self._pinned: torch.Tensor | None = None
        # One forward at a time: the hooks write into per-call state shared by the engine.
        self._lock = threading.Lock()
        self.calls = 0

    @property
    def spec(self) -> TeacherSpec:
        return self.teacher.spec

    @property
    def available_outputs(self) -> list[str]:
        return [LOGITS, *self.spec.taps]

    def infer(self, images: torch.Tensor, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Forward uint8 images [B, C, H, W]; return {name: float32 CPU tensor} for each requested output."""
        self._check_images(images)
        requested = self._check_outputs(outputs)
        with self._lock:
            with torch.inference_mode():
                x = self._preprocess(self._to_device(images))
                self._recording = frozenset(requested) - {LOGITS}
                try:
                    with torch.autocast(
                        device_type=self.device.type, dtype=torch.bfloat16, enabled=self._bf16
                    ):
                        logits = self._forward(x)
                    self.calls += 1
                    produced = {LOGITS: logits, **self._captured}
                    results = {name: produced[name].float().to("cpu") for name in requested}
                finally:
                    self._recording = frozenset()
                    self._captured = {}
            # Cloned outside inference mode: inference tensors cannot be saved for backward, and a caller's
            # loss may well save a teacher's map (an MSE against it, an encoder run on it).
            return {name: tensor.contiguous().clone() for name, tensor in results.items()}

    def feature_shapes(self, image_size: int | tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """(C, H, W) of every tap for inputs of `image_size` (one forward of a single blank image)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        blank = torch.zeros(1, self.spec.preprocessing.in_chans, height, width, dtype=torch.uint8)
        taps = list(self.spec.taps)
        return {tap: tuple(tensor.shape[1:]) for tap, tensor in self.infer(blank, taps).items()}

    def _tap_hook(self, tap: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if tap in self._recording:
                self._captured[tap] = output

        return record

    def _input_spec(self) -> str:
        size = self.spec.preprocessing.input_size
        return (
            f"uint8 images [B, C, H, W] with B >= 1 and C={self.spec.preprocessing.in_chans} "
            f"(model input size {size}x{size}; other sizes are resized)"
        )

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise InputSpecError(f"expected {self._input_spec()}, got a {type(images).__name__}")
        problem = None
        if images.dtype != torch.uint8:
            problem = f"dtype {images.dtype}"
        elif images.ndim != 4:
            problem = f"{images.ndim} dimensions (shape {list(images.shape)})"
        elif images.shape[1] != self.spec.preprocessing.in_chans:
            problem = f"{images.shape[1]} channels (shape {list(images.shape)})"
        elif images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            problem = f"an empty batch (shape {list(images.shape)})"
        if problem:
            raise InputSpecError(f"expected {self._input_spec()}, got {problem}")

    def _check_outputs(self, outputs: Sequence[str]) -> list[str]:
        if isinstance(outputs, str):  # a bare name would otherwise be read letter by letter
            outputs = [outputs]
        unknown = [name for name in outputs if name not in self.available_outputs]
        if unknown or not outputs:
            asked = f"unknown outputs {unknown}" if unknown else "no outputs requested"
            raise UnknownOutputError(f"{asked}; available outputs: {', '.join(self.available_outputs)}")
        return list(dict.fromkeys(outputs))

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda" or images.device.type == "cuda" or images.is_pinned():
            return images.to(self.device, non_blocking=True)
        # Staging through a reused pinned buffer makes the host-to-device copy asynchronous; reuse is safe
        # because every call ends by copying its outputs back, which waits for the stream.
        if self._pinned is None or self._pinned.numel() < images.numel():
            self._pinned = torch.empty(images.numel(), dtype=torch.uint8, pin_memory=True)
        staged = self._pinned[: images.numel()].view(images.shape)
        staged.copy_(images)
        return staged.to(self.device, non_blocking=True)

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        # (pixel / 255 - mean) / std in place, in the order written: at 224x224 a new tensor per step costs
        # more than a small model's forward.
        x = images.float().div_(255.0)
        size = self.spec.preprocessing.input_size
        if x.shape[-2:] != (size, size):
            # antialias matters only when shrinking, where it matches torchvision's Resize.
            x = F.interpolate(
                x,
                size=(size, size),
                mode=self.spec.preprocessing.interpolation,
                align_corners=False,
                antialias=True,
            )
        x = x.contiguous(memory_format=self._memory_format)
        return x.sub_(self._mean).div_(self._std)
