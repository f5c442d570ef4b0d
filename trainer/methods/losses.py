"""Loss terms shared by the distillation methods (notation of docs/methods.md: s student logits, t teacher
logits, y labels, p^T = softmax(z/T); KL with batchmean reduction, CE with mean reduction).

Teacher logits are dense [B, classes] tensors or `CompactLogits` (services/formats/soft_labels.py: top-k
logits and the tail's log-sum-exp). A compact teacher's softened distribution is exact on its kept classes and
spreads its tail's exact mass as the student's own softmax does there, so every term below reads it with no
more than the [B, classes] the student's logits already take; the terms then equal the KL with the tail merged
into one class."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from services.formats.soft_labels import CompactLogits

TeacherLogits = torch.Tensor | CompactLogits


def soft_targets(
    teacher_logits: Sequence[TeacherLogits],
    temperature: float,
    weights: Sequence[float] | None = None,
    student_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """p̄ = Σ w_i softmax(t_i / T): the (weighted) average of the teachers' softened probabilities.

    Averaging probabilities, not logits, is what Hinton et al. and MEAL-V2 do; the two differ.
    Weights are normalized to sum to one; None means equal weights. Compact teacher logits need
    `student_logits` (the logits the target is compared with), whose tail shape spreads the tail's mass; no
    gradient flows through the target.
    """
    if len(teacher_logits) == 0:
        raise ValueError("soft_targets needs at least one teacher's logits")
    if weights is None:
        weights = [1.0] * len(teacher_logits)
    if len(weights) != len(teacher_logits):
        raise ValueError(f"{len(weights)} teacher weights for {len(teacher_logits)} teachers")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"teacher weights must be non-negative with a positive sum, got {list(weights)}")
    probs = torch.stack([_softened(t, temperature, student_logits) for t in teacher_logits])
    w = torch.tensor([w / total for w in weights], dtype=probs.dtype, device=probs.device)
    return torch.einsum("t,tbc->bc", w, probs)


def _softened(
    teacher_logits: TeacherLogits, temperature: float, student_logits: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(teacher_logits, CompactLogits):
        if student_logits is None:
            raise ValueError("soft targets from compact teacher logits need the student's logits")
        return teacher_logits.target_probs(temperature, student_logits)
    return F.softmax(teacher_logits.float() / temperature, dim=1)


def summed(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ terms, added as Python's `sum` adds them (onto 0); the tensor that is, typed as one (`sum` types it
    Tensor | int, for no terms at all)."""
    total = sum(terms)
    if not isinstance(total, torch.Tensor):
        raise ValueError("summed needs at least one loss term")
    return total


def distillation_kl(
    student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T² · KL(target ‖ softmax(s/T)), batchmean. The T² keeps gradient scale independent of T (Hinton et
    al.)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p_student, target_probs, reduction="batchmean") * temperature**2


def hinton_kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """λ·CE(s, y) + (1−λ)·T²·KL(p_t^T ‖ p_s^T) with λ = alpha; CE on the raw student logits (labels smoothed
    by `label_smoothing`)."""
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    kl = distillation_kl(student_logits, target_probs, temperature)
    return alpha * ce + (1.0 - alpha) * kl, {"ce": ce.detach(), "kd": kl.detach()}
