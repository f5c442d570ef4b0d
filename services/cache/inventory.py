"""What a cache holds, per teacher, output and form, read from the keys' prefixes (Redis SCAN MATCH, LMDB
prefix cursors) and the stored sizes, never from the values, with what an entry costs the store all-in (its
own accounting: LMDB's pages, Redis's MEMORY USAGE, on a sample of each group); and dropping one teacher's
entries."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from services.cache.layout import KEY_NAMESPACE, key_prefix, parse_key, teacher_tag
from services.cache.store import TeacherOutputStore

IMAGENET_TRAIN_IMAGES = 1_281_167
_DELETE_STEP = 1000
SAMPLED_ENTRIES = 200  # per group, for the store's all-in count


@dataclass
class EntryGroup:
    """The entries of one (teacher tag, output, form label)."""

    tag: str
    output: str
    form: str
    entries: int = 0
    key_bytes: int = 0
    value_bytes: int = 0
    all_in_bytes: float | None = None
    """What the store spends holding one entry (key, value and its own overhead); None where it cannot say."""

    @property
    def bytes_per_entry(self) -> float:
        """Key and value bytes per entry, before the store's overhead."""
        return (self.key_bytes + self.value_bytes) / self.entries if self.entries else 0.0


def inventory(store: TeacherOutputStore) -> tuple[list[EntryGroup], int]:
    """The groups of this namespace's entries, largest first, and the number of other keys under the
    namespace that are not ekd entries (foreign or damaged keys)."""
    groups: dict[tuple[str, str, str], EntryGroup] = {}
    samples: dict[tuple[str, str, str], list[tuple[bytes, int]]] = {}
    unrecognized = 0
    for key, size in store.scan(KEY_NAMESPACE):
        fields = parse_key(key)
        if fields is None:
            unrecognized += 1
            continue
        group = groups.setdefault(
            (fields.tag, fields.output, fields.label), EntryGroup(fields.tag, fields.output, fields.label)
        )
        group.entries += 1
        group.key_bytes += len(key)
        group.value_bytes += size
        sample = samples.setdefault((fields.tag, fields.output, fields.label), [])
        if len(sample) < SAMPLED_ENTRIES:
            sample.append((key, size))
    measured = store.entry_bytes(list(samples.values()))
    if measured is not None:
        for group_key, all_in in zip(samples, measured, strict=True):
            groups[group_key].all_in_bytes = all_in
    ordered = sorted(groups.values(), key=lambda g: (-(g.key_bytes + g.value_bytes), g.tag, g.output, g.form))
    return ordered, unrecognized


def _chunks(keys: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    while chunk := list(islice(keys, size)):
        yield chunk


def evict_teacher(store: TeacherOutputStore, teacher: str) -> int:
    """Delete every entry of the teacher, given by its identity or its key tag (a tag is its own tag); the
    number deleted."""
    # The keys are collected first: deleting while an LMDB cursor or a Redis SCAN walks them would skip some.
    keys = [key for key, _ in store.scan(key_prefix(teacher_tag(teacher)))]
    for chunk in _chunks(iter(keys), _DELETE_STEP):
        store.delete_many(chunk)
    return len(keys)
