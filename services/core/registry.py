"""One registry type for everything ekd builds by name: teachers, students and methods.

After timm's `_registry.py`: a module registers its entries as it is imported, and one door builds by name.
A name is registered once (a second registration is an error, never a silent overwrite), and an unknown name
is a `UnknownNameError` that lists what exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from services.core.errors import UnknownNameError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries by unique name; `kind` ("teacher", "student architecture", "method") words the errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> Entry:
        """Register `entry` under `name`; a name already taken is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str | None = None) -> Callable[[Entry], Entry]:
        """`@registry.decorator()` registers the decorated object under its `__name__` (or `name`)."""

        def register(entry: Entry) -> Entry:
            return self.add(name or entry.__name__, entry)  # type: ignore[attr-defined]

        return register

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
