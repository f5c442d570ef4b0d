"""The content-keyed teacher-output cache: LMDB on local disk by default, Redis in production.

Open a store with `open_store(uri)`; derive keys with `input_digests` and `OutputEntries`
(`services.cache.layout`, the one key layout). Callers that can do
without the cache read and write it through `guarded(store)` (a circuit breaker: `services.cache.guard`) and
say what they expect under each key (`ValueSpec`); values are authenticated when a secret is configured
(`services.cache.authentication`).
"""

from services.cache.guard import GuardedStore, GuardStats, Lookup, Outcome, guarded
from services.cache.layout import (
    COMPACT,
    FORMS,
    FULL,
    KEY_NAMESPACE,
    QUANTIZED,
    CachedValue,
    KeyFields,
    OutputEntries,
    ValueSpec,
    input_digest,
    input_digests,
    key_prefix,
    output_key,
    parse_key,
    stored_form,
    teacher_tag,
)
from services.cache.store import (
    CacheError,
    CacheFullError,
    CacheStats,
    CacheUnavailableError,
    CacheUnreachableError,
    TeacherOutputStore,
)
from services.cache.uri import open_store

__all__ = [
    "COMPACT",
    "FORMS",
    "FULL",
    "KEY_NAMESPACE",
    "QUANTIZED",
    "CacheError",
    "CachedValue",
    "KeyFields",
    "CacheFullError",
    "CacheStats",
    "CacheUnavailableError",
    "CacheUnreachableError",
    "GuardStats",
    "GuardedStore",
    "Lookup",
    "Outcome",
    "OutputEntries",
    "TeacherOutputStore",
    "ValueSpec",
    "guarded",
    "input_digest",
    "input_digests",
    "key_prefix",
    "open_store",
    "output_key",
    "parse_key",
    "stored_form",
    "teacher_tag",
]
