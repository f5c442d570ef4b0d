"""ONE — On-the-fly Native Ensemble (Lan, Zhu, Gong, "Knowledge Distillation by On-the-Fly Native
Ensemble", NeurIPS 2018; official code Lan1991Xu/ONE_NeurIPS2018). No external teacher: the branches of one
network and their gated ensemble teach each other while training.

Network: a CIFAR ResNet whose conv1, layer1 and layer2 are shared and whose layer3 and classifier are copied
into m branches (m=3); with `trunk: imagenet_resnet`, timm's ImageNet ResNet `arch` (e.g. resnet18) in the
same layout: its stem (conv1, bn1, ReLU, max-pool) and layer1–layer3 shared, its last stage layer4 and the
classifier per branch. A gate reads the shared output (layer2's; layer3's on the ImageNet trunk):
    g = softmax(ReLU(BN1d(Linear_{C→m}(GAP(shared)))))          (per sample, sums to 1)
    z_e = Σ_i g_i · z_i                                            (the on-the-fly teacher's logits)
Loss (paper Eq. 1–5, as the official training script computes it):
    L = Σ_i CE(z_i, y) + CE(z_e, y) + w(t) · T² · Σ_i KL(p_{z_e}^T.detach() ‖ p_{z_i}^T),   T = 3
    w(t) = exp(−5 (1 − min(t / rampup, 1))²)                       (sigmoid ramp-up, Laine & Aila 2017)
The ensemble target of the KL is detached, so the gate learns only from CE(z_e, y).

Defaults: depth 32 (the paper's smallest CIFAR network), 3 branches, T = 3, ramp-up over 80 epochs (the
official README's advice; short runs set it smaller). Official schedule: SGD lr 0.1, momentum 0.9, weight
decay 1e-4, batch 128, 300 epochs, lr ×0.1 at epochs 151 and 225. Reported test error (%): CIFAR-10
ResNet-32 5.99, ResNet-110 5.17; CIFAR-100 ResNet-32 26.61, ResNet-110 21.62.

The headline is a single branch, as the paper and the official code report ONE (a deployed ONE network is
one branch; the official script keeps the best branch): `predict` is branch 0's logits (the branches are
alike, and choosing the best on the test split would select on test data). The gated ensemble z_e is
"ONE-E", exported as `one_ensemble` and reported beside it; every branch is exported to deploy alone, and
its baseline is the same network (a plain ResNet of `depth`) trained alone with CE.

Choices ekd made where the sources leave room:
- w(t) reads the fractional epoch of the training clock, so the weight rises within an epoch too; the
  official script evaluates it once per whole epoch.
- The CIFAR network is `MultiBranchResNet`, built from basic blocks at every depth; the official ResNet-110
  (depth ≥ 44) uses bottleneck blocks instead. The ImageNet trunk has timm's blocks (bottleneck from
  resnet50 on).
- The KL target is the plain softened ensemble; the official KL adds 1e-7 to it before the log, which
  `F.kl_div` does not need (it defines 0·log 0 = 0).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from trainer.methods.base import (
    LossResult,
    Method,
    TeacherInfo,
    TeacherOutputs,
    TrainingClock,
)
from trainer.methods.losses import distillation_kl, summed
from trainer.methods.registry import register_method
from trainer.students import BranchOutputs, MultiBranchTrunk, MultiBranchTrunkParams, StudentConfig

# Every stage but the last is shared: CIFAR ResNets have 3 stages, ImageNet ResNets 4.
_SHARED_STAGES = {"cifar_resnet": 2, "imagenet_resnet": 3}


class ONEParams(MultiBranchTrunkParams):
    """Config section of ONE (`method: {name: one, ...}`)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["one"] = "one"
    default_depth: ClassVar[int] = 32  # the paper's smallest CIFAR network
    branches: int = Field(3, ge=2, le=16, description="number of branches m sharing every stage but the last")
    temperature: float = Field(3.0, gt=0.0, description="softmax temperature T of the branch-to-ensemble KL")
    rampup_epochs: float = Field(
        80.0, ge=0.0, description="epochs over which the KL weight w(t) rises to 1 (0: 1 throughout)"
    )


def sigmoid_rampup(epoch: float, rampup_epochs: float) -> float:
    """w(t) = exp(−5 (1 − min(t / rampup, 1))²): exp(−5) at t=0, 1 from t=rampup on (Laine & Aila 2017)."""
    if rampup_epochs == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0) / rampup_epochs, 1.0)
    return math.exp(-5.0 * phase * phase)


class BranchGate(nn.Module):
    """g = softmax(ReLU(BN1d(Linear(GAP(shared))))): per-sample branch weights that sum to one."""

    def __init__(self, in_channels: int, num_branches: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        scores = torch.relu(self.bn(self.linear(torch.flatten(self.pool(shared), 1))))
        return F.softmax(scores, dim=1)


class GatedBranchNet(nn.Module):
    """ONE's network: the multi-branch trunk and its gate. `forward` returns the gated ensemble logits z_e."""

    def __init__(self, trunk: MultiBranchTrunk) -> None:
        super().__init__()
        self.trunk = trunk
        self.gate = BranchGate(trunk.shared_channels, trunk.num_branches)

    def forward_parts(self, images: torch.Tensor) -> tuple[BranchOutputs, torch.Tensor]:
        """The branch outputs and the gate g [B, m] for one batch."""
        outputs = self.trunk.forward_branches(images)
        return outputs, self.gate(outputs.shared)

    @staticmethod
    def ensemble_logits(branch_logits: list[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
        """z_e = Σ_i g_i · z_i, per sample."""
        return torch.einsum("bm,mbc->bc", gate, torch.stack(branch_logits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs, gate = self.forward_parts(images)
        return self.ensemble_logits(outputs.logits, gate)


class OnTheFlyNativeEnsemble(Method):
    """ONE: branches and their gated ensemble trained together; the ensemble teaches every branch."""

    name = "one"

    def __init__(self, params: ONEParams, *, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.params = params
        trunk = params.build_trunk(
            num_classes=num_classes,
            in_chans=in_chans,
            branch_widths=[1.0] * params.branches,
            shared_stages=_SHARED_STAGES[params.trunk],
        )
        self.network = GatedBranchNet(trunk)

    def training_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teachers: TeacherOutputs | None,
        clock: TrainingClock,
    ) -> LossResult:
        outputs, gate = self.network.forward_parts(images)
        ensemble = self.network.ensemble_logits(outputs.logits, gate)
        temperature = self.params.temperature
        target = F.softmax(ensemble.detach() / temperature, dim=1)
        ce_branches = summed(self.hard_label_loss(z, labels) for z in outputs.logits)
        ce_ensemble = self.hard_label_loss(ensemble, labels)
        kl = summed(distillation_kl(z, target, temperature) for z in outputs.logits)
        weight = sigmoid_rampup(clock.epoch, self.params.rampup_epochs)
        loss = ce_branches + ce_ensemble + weight * kl
        return LossResult(
            loss,
            {
                "ce_branches": ce_branches.detach(),
                "ce_ensemble": ce_ensemble.detach(),
                "kl": kl.detach(),
                "kl_weight": torch.tensor(weight),
            },
            outputs.logits[0].detach(),  # branch 0 is the method's prediction (`predict`)
        )

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.trunk.forward_branches(images).logits[0]

    def headline(self) -> str:
        return "branch_0"

    def exported_students(self) -> dict[str, nn.Module]:
        students: dict[str, nn.Module] = {}
        for index in range(self.network.trunk.num_branches):
            students[f"branch_{index}"] = self.network.trunk.export_branch(index)
        students["one_ensemble"] = self.network
        return students

    def alone_networks(self) -> dict[str, StudentConfig]:
        return {
            f"branch_{index}": self.network.trunk.alone_network(index)
            for index in range(self.network.trunk.num_branches)
        }


@register_method(ONEParams, uses_teachers=False)
def build_one(params: ONEParams, *, num_classes: int, in_chans: int, teachers: list[TeacherInfo]) -> Method:
    return OnTheFlyNativeEnsemble(params, num_classes=num_classes, in_chans=in_chans)
