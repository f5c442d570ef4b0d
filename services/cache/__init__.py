"""The content-keyed teacher-output cache: LMDB on local disk by default, Redis in production.

Open a store with `open_store(uri)`; derive keys with `input_digests` and `output_key`.
"""

from services.cache.store import (
    CacheError,
    CacheFullError,
    CacheStats,
    CacheUnavailableError,
    TeacherOutputStore,
    input_digest,
    input_digests,
    output_key,
)
from services.cache.uri import open_store

__all__ = [
    "CacheError",
    "CacheFullError",
    "CacheStats",
    "CacheUnavailableError",
    "TeacherOutputStore",
    "input_digest",
    "input_digests",
    "open_store",
    "output_key",
]
