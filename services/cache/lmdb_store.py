"""The default teacher-output store: one LMDB environment on local disk.

LMDB gives many concurrent readers and one writer at a time across processes (its lock file does the
coordination), so several training workers on one host can share a cache directory. LMDB allows one open
environment per directory per process, so stores on the same directory in one process (a service and a client
side by side, say) share it, reference-counted. The map size is fixed when opened, not grown automatically:
growing it safely needs every process to reopen, so a full map is reported with the size to ask for instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import lmdb

from services.cache.store import CacheError, CacheFullError, CacheUnavailableError, TeacherOutputStore

DEFAULT_MAP_SIZE = 8 * 2**30  # 8 GiB of address space; the file only grows as data is written


@dataclass
class _SharedEnvironment:
    env: lmdb.Environment
    readonly: bool
    users: int


_OPEN: dict[str, _SharedEnvironment] = {}  # by resolved directory; guarded by _OPEN_LOCK
_OPEN_LOCK = threading.Lock()


def _acquire(path: Path, map_size: int, readonly: bool) -> lmdb.Environment:
    key = str(path.resolve())
    with _OPEN_LOCK:
        if key in _OPEN:
            entry = _OPEN[key]
            if entry.readonly and not readonly:
                raise CacheUnavailableError(
                    f"LMDB cache at {path} is already open read-only in this process; "
                    "open it for writing first"
                )
            entry.users += 1
            return entry.env
        env = lmdb.open(
            key,
            map_size=map_size,
            readonly=readonly,
            lock=True,
            create=not readonly,
            subdir=True,
            readahead=False,
        )
        _OPEN[key] = _SharedEnvironment(env, readonly, users=1)
        return env


def _release(path: Path) -> None:
    key = str(path.resolve())
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            return
        entry.users -= 1
        if entry.users == 0:
            entry.env.close()
            del _OPEN[key]


_PACK_STEP = 10_000  # entries per write transaction of `copy_packed`
_PAGE_HEADER = 16  # LMDB's page header
_NODE_HEADER = 8  # a leaf node's header
_SLOT = 2  # a node's offset in its page


def _node_limit(page: int) -> int:
    """The largest leaf node (header, key and value) LMDB keeps on a leaf page (its me_nodemax)."""
    return ((page - _PAGE_HEADER) // 2 & -2) - _SLOT


def _overflows(key_bytes: int, value_bytes: int, page: int) -> bool:
    return _NODE_HEADER + key_bytes + value_bytes > _node_limit(page)


def _own_pages(key_bytes: int, value_bytes: int, page: int) -> int:
    """Bytes of the overflow pages an entry's value takes to itself (0 when it fits a leaf)."""
    if not _overflows(key_bytes, value_bytes, page):
        return 0
    return -(-(value_bytes + _PAGE_HEADER) // page) * page


def _on_leaf(key_bytes: int, value_bytes: int, page: int) -> int:
    """Bytes an entry puts on its leaf page: node header, key, the value or its overflow page number, slot."""
    stored = 8 if _overflows(key_bytes, value_bytes, page) else value_bytes
    return (_NODE_HEADER + key_bytes + stored + 1 & -2) + _SLOT


class LmdbStore(TeacherOutputStore):
    """Teacher outputs in the LMDB environment at directory `path` (created unless `readonly`); `hmac_key`
    authenticates values (see `TeacherOutputStore`)."""

    def __init__(
        self,
        path: str | Path,
        map_size: int = DEFAULT_MAP_SIZE,
        readonly: bool = False,
        hmac_key: bytes | None = None,
    ) -> None:
        super().__init__(hmac_key)
        if map_size <= 0:
            raise ValueError(f"map_size must be a positive number of bytes; got {map_size}")
        self.path = Path(path)
        self.map_size = map_size
        self.readonly = readonly
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
            self._env: lmdb.Environment | None = _acquire(self.path, map_size, readonly)
        except (lmdb.Error, OSError) as error:
            raise CacheUnavailableError(f"cannot open LMDB cache at {self.path}: {error}") from error

    @property
    def _open_env(self) -> lmdb.Environment:
        """The environment; ValueError once the store is closed (a bug in the caller, not a cache outage)."""
        if self._env is None:
            raise ValueError(f"LMDB cache at {self.path} is closed")
        return self._env

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        """LMDB's own errors (readers table full, a damaged file) as CacheError: callers may do without."""
        try:
            yield
        except lmdb.Error as error:
            raise CacheError(f"LMDB cache at {self.path} failed: {type(error).__name__}: {error}") from error

    def _get_raw(self, keys: list[bytes]) -> list[bytes | None]:
        with self._translated_errors(), self._open_env.begin(write=False) as txn:
            return [txn.get(key) for key in keys]

    def _put_raw(self, items: list[tuple[bytes, bytes]]) -> None:
        if self.readonly:
            raise CacheError(
                f"LMDB cache at {self.path} is open read-only; reopen with readonly=False to write"
            )
        with self._translated_errors():
            try:
                with self._open_env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value, overwrite=True)
            except lmdb.MapFullError as error:
                needed = sum(len(key) + len(value) for key, value in items)
                raise CacheFullError(
                    f"LMDB cache at {self.path} is full (map_size={self.map_size} bytes) writing "
                    f"{len(items)} values of {needed} bytes; reopen it with a larger map_size, "
                    f"e.g. map_size={2 * self.map_size}"
                ) from error

    def _scan_raw(self, prefix: bytes) -> Iterator[tuple[bytes, int]]:
        # One read transaction with buffers: the values' sizes come from the memory map, nothing is copied.
        with self._open_env.begin(write=False, buffers=True) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix):
                return
            for key_view, value in cursor:
                key = bytes(key_view)
                if not key.startswith(prefix):
                    return
                yield key, len(value)

    def entry_bytes(self, groups: Sequence[Sequence[tuple[bytes, int]]]) -> list[float] | None:
        # LMDB counts pages, not entries: a value too large for a leaf takes whole overflow pages of its
        # own (`_own_pages`, exact); the branch and leaf pages are shared out by each entry's bytes on them,
        # at the tree's measured fill (pages in use over the bytes every key in it puts on them).
        stat = self._open_env.stat()
        page = stat["psize"]
        on_tree = sum(_on_leaf(len(key), size, page) for key, size in self._scan_raw(b""))
        per_byte = (stat["branch_pages"] + stat["leaf_pages"]) * page / on_tree if on_tree else 0.0
        return [
            sum(
                _own_pages(len(key), size, page) + per_byte * _on_leaf(len(key), size, page)
                for key, size in group
            )
            / max(1, len(group))
            for group in groups
        ]

    def _delete_raw(self, keys: list[bytes]) -> None:
        # A read-only handle cannot delete; the damaged value stays a miss until a writer replaces it.
        if self.readonly:
            return
        with self._translated_errors(), self._open_env.begin(write=True) as txn:
            for key in keys:
                txn.delete(key)

    def copy_packed(self, destination: str | Path) -> int:
        """Copy every entry, in key order, into a new LMDB environment at `destination` (an empty or new
        folder), whose leaf pages come out full: keys that arrive in hash order, as a bank's do, leave leaf
        pages about 69 % full (a page splits in half), while appending in key order fills each page before
        the next (compact entries: 143 -> 98 bytes all-in, `benchmarks/bank_bytes.py`). The number of
        entries copied."""
        target = Path(destination)
        if target.exists() and any(target.iterdir()):
            raise CacheUnavailableError(f"cannot pack LMDB cache {self.path} into {target}: it is not empty")
        copied = 0
        packed = LmdbStore(target, map_size=self.map_size)
        with (
            self._translated_errors(),
            packed,
            self._open_env.begin(write=False, buffers=True) as source,
        ):
            entries = source.cursor().iternext()
            while step := list(islice(entries, _PACK_STEP)):
                with packed._open_env.begin(write=True) as txn:
                    for key, value in step:
                        txn.put(bytes(key), bytes(value), append=True)
                copied += len(step)
        return copied

    def close(self) -> None:
        if self._env is not None:
            _release(self.path)
            self._env = None
