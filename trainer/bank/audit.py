"""`ekd cache verify`: recompute a random sample of an experiment's cached teacher outputs with the teachers
(in process, or through the teacher service with `bypass_cache`: a fresh forward pass that neither reads nor
writes the cache) and measure how far the stored values are from them.

The sample is drawn from the experiment's replayed training views (the cache's keys are hashes of the input
bytes, so only inputs one can make again can be checked); views until N are found cached per teacher and
output. Deviations: in logits (at the kept classes for the compact form), and in probabilities at the
experiment's temperature (for the compact form: at the kept classes and in the tail's total). An entry beyond
either tolerance is reported and, with `fix`, deleted, so that the next run recomputes it."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from services.cache import TeacherOutputStore, input_digests, stored_form, teacher_tag
from services.core.errors import ConfigError
from services.formats.soft_labels import CompactLogits
from services.rpc.client import TeacherClient
from services.teachers.engine import TeacherEngine
from services.teachers.zoo import create_teacher
from trainer.bank.writer import bank_entries, requested_outputs
from trainer.config import ExperimentConfig, TeacherConfig
from trainer.runs.inputs import load_splits, train_views

_CANDIDATES_PER_ENTRY = 20  # views looked at per entry asked for, before giving up on finding more cached


@dataclass
class Audit:
    """The checked entries of one teacher output in one form."""

    teacher: str
    tag: str
    output: str
    form: str
    checked: int = 0
    max_logit_deviation: float = 0.0
    max_probability_deviation: float = 0.0
    bad: list[bytes] = field(default_factory=list)


def _deviations(stored, computed: torch.Tensor, temperature: float) -> tuple[float, float]:
    """(largest |logit difference|, largest |probability difference| at T) of one entry."""
    computed = computed.float()
    true_probs = torch.softmax(computed / temperature, dim=0)
    if isinstance(stored, CompactLogits):
        indices = stored.indices[0]
        logit = (stored.values[0] - computed[indices]).abs().max().item()
        log_top, log_tail = stored.log_probs(temperature)
        kept = (log_top[0].exp() - true_probs[indices]).abs().max().item()
        tail = abs(log_tail[0].exp().item() - (1 - true_probs[indices].sum().item()))
        return logit, max(kept, tail)
    logit = (stored.float() - computed).abs().max().item()
    if stored.dim() != 1:  # a feature map has no probabilities
        return logit, 0.0
    probs = torch.softmax(stored.float() / temperature, dim=0)
    return logit, (probs - true_probs).abs().max().item()


def verify_cache(
    cfg: ExperimentConfig,
    store: TeacherOutputStore,
    sample: int,
    *,
    logit_tolerance: float = 0.05,
    probability_tolerance: float = 0.005,
    fix: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    service: str | None = None,
) -> list[Audit]:
    """Check up to `sample` cached entries per teacher output of `cfg`, in its `teacher_source.soft_labels`
    form; delete those beyond tolerance when `fix`. The teachers run here from their checkpoints, or, with
    `service` (host:port), on the teacher service under their `served_as` names (TLS and token from the
    environment, as for every client)."""
    temperature = float(getattr(cfg.method, "temperature", 1.0))
    splits = load_splits(cfg)
    views = train_views(splits, cfg.data)
    total = len(views) * (views.views if views.augments else 1)
    order = random.Random(seed).sample(range(total), min(total, sample * _CANDIDATES_PER_ENTRY))
    form = cfg.teacher_source.soft_labels
    audits = []
    outputs = requested_outputs(cfg, splits.num_classes, splits.in_chans, splits.image_size)
    with ExitStack() as closing:
        client = closing.enter_context(TeacherClient(service, output_dtype="float32")) if service else None
        for teacher_cfg, wanted in zip(cfg.teachers, outputs, strict=True):
            identity, compute = _teacher(teacher_cfg, splits.num_classes, client)
            for output in wanted:
                audit = Audit(teacher_cfg.name, teacher_tag(identity), output, stored_form(output, form))
                for start in range(0, len(order), batch_size):
                    if audit.checked >= sample:
                        break
                    made = [
                        views.view(i % len(views), i // len(views)) for i in order[start : start + batch_size]
                    ]
                    images = torch.stack([view for view in made if view is not None])
                    keys = bank_entries(identity, [output], form)[output].keys(input_digests(images))
                    found = store.get_many(keys)
                    wanted_now = sample - audit.checked
                    cached = [i for i, value in enumerate(found) if value is not None][:wanted_now]
                    if not cached:
                        continue
                    computed = compute(images[cached], output)
                    for row, i in enumerate(cached):
                        logit, probability = _deviations(found[i], computed[row], temperature)
                        audit.max_logit_deviation = max(audit.max_logit_deviation, logit)
                        audit.max_probability_deviation = max(audit.max_probability_deviation, probability)
                        if logit > logit_tolerance or probability > probability_tolerance:
                            audit.bad.append(keys[i])
                    audit.checked += len(cached)
                if fix and audit.bad:
                    store.delete_many(audit.bad)
                audits.append(audit)
    return audits


def _teacher(
    teacher_cfg: TeacherConfig, num_classes: int, client: TeacherClient | None
) -> tuple[str, Callable[[torch.Tensor, str], torch.Tensor]]:
    """The teacher's identity, and how to compute one of its outputs for a batch of images: in process from
    its checkpoint, or by the service (a fresh forward pass)."""
    if client is None:
        teacher = create_teacher(teacher_cfg.name, num_classes, checkpoint=teacher_cfg.checkpoint)
        engine = TeacherEngine(teacher)
        return teacher.spec.identity, lambda images, output: engine.infer(images, [output])[output]
    served = teacher_cfg.served_as or teacher_cfg.name
    hosted = client.teachers()
    if served not in hosted:
        raise ConfigError(
            f"the teacher service at {client.address} hosts no teacher {served!r} (teachers[].served_as); "
            f"it hosts: {', '.join(sorted(hosted))}"
        )

    def fetched(images: torch.Tensor, output: str) -> torch.Tensor:
        result = client.fetch(images, [served], [output], bypass_cache=True)[served][output]
        assert isinstance(result, torch.Tensor)  # asked for in full, the default form
        return result

    return hosted[served].identity, fetched
