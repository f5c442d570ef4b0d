"""The content-keyed teacher-output cache: LMDB on local disk by default, Redis in production.

Open a store with `open_store(uri)`; derive keys with `input_digests` and `output_key`.
"""

from services.cache.store import (
    COMPACT,
    FORMS,
    FULL,
    CachedValue,
    CacheError,
    CacheFullError,
    CacheStats,
    CacheUnavailableError,
    KeyFields,
    TeacherOutputStore,
    input_digest,
    input_digests,
    key_prefix,
    output_key,
    parse_key,
    teacher_tag,
)
from services.cache.uri import open_store

__all__ = [
    "COMPACT",
    "FORMS",
    "FULL",
    "CacheError",
    "CachedValue",
    "KeyFields",
    "CacheFullError",
    "CacheStats",
    "CacheUnavailableError",
    "TeacherOutputStore",
    "input_digest",
    "input_digests",
    "key_prefix",
    "open_store",
    "output_key",
    "parse_key",
    "teacher_tag",
]
