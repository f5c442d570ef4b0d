"""ResNet-50 with a fraction of its filters pruned by L1 norm (Li, Kadav, Durdanovic, Samet, Graf, "Pruning
Filters for Efficient ConvNets", ICLR 2017), built as a smaller dense network: seed 000's students.

In every bottleneck, conv1's and conv2's filters are ranked by the L1 norm of their weights and the smallest
`prune_ratio` of them (`int(filters × prune_ratio)`) removed, with the BN statistics and affine parameters of
the kept channels and the next conv's matching input channels. conv3 keeps its filters, so the block output
and the shortcut keep their width, as Li et al. do for ResNets. The kept filters keep their order and their
weights: the pruned network computes exactly what the original computes with the pruned channels' activations
set to zero after their BN and ReLU.

Ranking follows Li et al.'s "greedy" variant: conv2's filters are ranked on the kernels that remain after
conv1's pruning (the paper finds it slightly better than ranking on all kernels). The paper fine-tunes after
pruning; here the distillation that trains the student does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

import timm
import torch
from timm.models.resnet import Bottleneck
from torch import nn

from trainer.students.initial_weights import load_initial_weights
from trainer.students.registry import STUDENTS, count_parameters

logger = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def l1_kept_filters(weight: torch.Tensor, prune_ratio: float) -> torch.Tensor:
    """Indices, ascending, of the filters (dim 0 of `weight`) kept after pruning the `int(n × prune_ratio)`
    of smallest L1 norm."""
    filters = weight.shape[0]
    norms = weight.detach().abs().flatten(1).sum(1)
    return norms.topk(filters - int(filters * prune_ratio)).indices.sort().values


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's size attribute as the pair Conv2d takes: it stores two, typed as a tuple of any length."""
    height, width = size
    return height, width


def _conv_subset(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    """A dense conv like `conv` (ungrouped) holding `weight` [out, in, kh, kw]."""
    pruned = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        _pair(conv.kernel_size),
        _pair(conv.stride),
        conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
        _pair(conv.dilation),
        bias=False,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        pruned.weight.copy_(weight)
    return pruned


def _batch_norm_subset(bn: nn.BatchNorm2d, kept: torch.Tensor) -> nn.BatchNorm2d:
    """The channels `kept` of `bn`: affine parameters and running statistics."""
    pruned = nn.BatchNorm2d(len(kept), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            pruned.weight.copy_(bn.weight[kept])
            pruned.bias.copy_(bn.bias[kept])
        if bn.track_running_stats:
            # Both track running statistics (the same flag), so both hold these buffers, typed optional.
            assert bn.running_mean is not None and bn.running_var is not None
            assert bn.num_batches_tracked is not None
            assert pruned.running_mean is not None and pruned.running_var is not None
            assert pruned.num_batches_tracked is not None
            pruned.running_mean.copy_(bn.running_mean[kept])
            pruned.running_var.copy_(bn.running_var[kept])
            pruned.num_batches_tracked.copy_(bn.num_batches_tracked)
    return pruned


def prune_bottleneck(block: Bottleneck, prune_ratio: float) -> None:
    """Replace `block`'s conv1/bn1, conv2/bn2 and conv3's inputs by their kept channels, in place."""
    if block.conv2.groups != 1 or block.conv1.bias is not None or block.conv2.bias is not None:
        raise ValueError("L1 filter pruning covers ungrouped, bias-free bottleneck convs (ResNet-50's)")
    bn1, bn2 = block.bn1, block.bn2
    if not isinstance(bn1, nn.BatchNorm2d) or not isinstance(bn2, nn.BatchNorm2d):
        raise ValueError("L1 filter pruning covers bottlenecks normalized by BatchNorm2d (ResNet-50's)")
    keep1 = l1_kept_filters(block.conv1.weight, prune_ratio)
    conv2_weight = block.conv2.weight.detach()[:, keep1]
    keep2 = l1_kept_filters(conv2_weight, prune_ratio)
    block.conv1 = _conv_subset(block.conv1, block.conv1.weight.detach()[keep1])
    block.bn1 = _batch_norm_subset(bn1, keep1)
    block.conv2 = _conv_subset(block.conv2, conv2_weight[keep2])
    block.bn2 = _batch_norm_subset(bn2, keep2)
    block.conv3 = _conv_subset(block.conv3, block.conv3.weight.detach()[:, keep2])


def prune_resnet_filters(model: ModuleT, prune_ratio: float) -> ModuleT:
    """Prune every bottleneck of a timm ResNet in place (see the module docstring); returns `model`."""
    if not 0 <= prune_ratio < 1:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no bottleneck blocks to prune")
    for block in blocks:
        prune_bottleneck(block, prune_ratio)
    return model


@STUDENTS.decorator()
def resnet50_l1_pruned(
    num_classes: int, prune_ratio: float = 0.25, source_checkpoint: str | None = None, in_chans: int = 3
) -> nn.Module:
    """timm's ResNet-50 with `prune_ratio` of every bottleneck's conv1 and conv2 filters pruned by L1 norm,
    from the weights in `source_checkpoint` (a ResNet-50 in timm's or torchvision's layout; its classifier
    is re-initialised when it predicts another number of classes), or from random weights when None."""
    source = timm.create_model("resnet50", num_classes=num_classes, in_chans=in_chans)
    if source_checkpoint is not None:
        load_initial_weights(
            source, Path(source_checkpoint), field="source_checkpoint", architecture="resnet50_l1_pruned"
        )
    unpruned = count_parameters(source)
    pruned = prune_resnet_filters(source, prune_ratio)
    logger.info(
        "resnet50_l1_pruned: %g%% of the bottleneck filters pruned by L1 norm from %s: %s -> %s parameters",
        prune_ratio * 100,
        source_checkpoint or "random weights",
        f"{unpruned:,}",
        f"{count_parameters(pruned):,}",
    )
    return pruned
