"""The student's input: uint8 pixels standardized per channel, the last step, on the student's side only."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The student's input: uint8 images [..., C, H, W] → float32 `(x / 255 − mean) / std` per channel."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    channels = images.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}"
        )
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t
