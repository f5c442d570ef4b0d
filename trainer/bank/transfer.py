"""Banks that travel: a teacher-output bank exported from one store as Parquet shards with a manifest, and
imported into another store (another cluster's), which then trains from it with no teacher call.

A bank directory holds `manifest.json` and `shard-NNNNN.parquet` files. Each shard is a table of two binary
columns, `key` (the cache key, `services.cache.layout`) and `value` (the bytes the store held: the value's
frame, and its HMAC tag when the exporting store authenticates), zstd-compressed. The manifest gives the
format, whether the values carry tags, and per shard its file, entry count, size, sha256 and entries per
teacher tag, output and form (read from the keys). Plain Python and pyarrow; `trainer.bank.ray_transfer`
runs the shards as a Ray Data job.

Import checks each shard whole before it writes any of it: its sha256 and entry count against the manifest,
its columns, and, for a tagged bank, every value's tag under the exporter's secret. A shard that fails is
named and not imported; the others are. HMAC semantics travel with the values:

- The exporter's tags stay on the values in the files, so nobody without the secret can plant targets in a
  bank, even one who rewrites a shard and its manifest checksum.
- A tagged bank is verified on import under the exporter's secret: the importing store's own (one secret
  for both clusters), or the one `source_hmac_key` gives. Verified values are written re-tagged under the
  importing store's secret (as they were, when it is the same one; frames alone into a store without a
  secret).
- An untagged bank is refused by a store that authenticates: nobody vouched for its values, and tagging them
  on import would launder them. Into a store without a secret it is written as it is; its values' frames
  are still checked on every read, as any value is.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Protocol, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from services.cache import open_store, parse_key
from services.cache.authentication import MIN_KEY_BYTES, ValueAuthenticator, hmac_key_from_environment
from services.core.errors import UserError
from services.core.redaction import redact

FORMAT = "ekd-bank/1"
MANIFEST = "manifest.json"
DEFAULT_ENTRIES_PER_SHARD = 100_000
_SCHEMA = pa.schema([("key", pa.binary()), ("value", pa.binary())])
_STEP = 1000  # entries per store round trip

Task = TypeVar("Task")
Done = TypeVar("Done")


class MapShards(Protocol):
    """How shards are run: `fn` over every task, the results in the tasks' order (`trainer.bank.ray_transfer`
    runs them as a Ray Data job). `fn` and the tasks are picklable."""

    def __call__(self, fn: Callable[[Task], Done], tasks: list[Task]) -> list[Done]: ...


class BankError(UserError):
    """A bank directory or an import that cannot be used as asked; one line says why."""


@dataclass(frozen=True)
class ShardRecord:
    """One shard file as the manifest lists it."""

    file: str
    entries: int
    bytes: int
    sha256: str
    groups: dict[str, int] = field(default_factory=dict)  # entries per "tag:output:form"


@dataclass(frozen=True)
class Manifest:
    authenticated: bool  # the values carry the exporter's HMAC tags
    shards: list[ShardRecord]
    source: str = ""  # the exporting store's URI, redacted
    format: str = FORMAT

    @property
    def entries(self) -> int:
        return sum(shard.entries for shard in self.shards)


@dataclass(frozen=True)
class ShardImported:
    """What became of one shard on import: `problem` None when its `entries` were written."""

    file: str
    entries: int
    problem: str | None = None


def _chunks(items: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    while chunk := list(islice(items, size)):
        yield chunk


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _group(key: bytes) -> str:
    fields = parse_key(key)
    return f"{fields.tag}:{fields.output}:{fields.label}" if fields is not None else "unrecognized"


def write_shard(source_uri: str, keys: list[bytes], path: Path) -> ShardRecord:
    """Write the stored bytes of `keys` in the store at `source_uri` to the Parquet file `path`; keys gone
    since they were listed (evicted, expired) are left out."""
    rows: list[tuple[bytes, bytes]] = []
    with open_store(source_uri, hmac_key=None) as store:  # stored bytes travel as they are: no secret needed
        for step in _chunks(iter(keys), _STEP):
            rows += [(k, v) for k, v in zip(step, store.read_stored(step), strict=True) if v is not None]
    table = pa.table(
        {"key": [k for k, _ in rows], "value": [v for _, v in rows]},
        schema=_SCHEMA,
    )
    pq.write_table(table, path, compression="zstd")
    groups = Counter(_group(key) for key, _ in rows)
    return ShardRecord(path.name, len(rows), path.stat().st_size, _sha256(path), dict(sorted(groups.items())))


def export_bank(
    source_uri: str,
    directory: Path,
    map_shards: MapShards,
    *,
    entries_per_shard: int | None = None,
) -> Manifest:
    """Export every entry of the store at `source_uri` into `directory` (created; it must hold no bank yet),
    `entries_per_shard` to a shard (None: DEFAULT_ENTRIES_PER_SHARD), shards run by `map_shards`; the
    manifest is written last, so a directory with one holds a whole bank."""
    entries_per_shard = DEFAULT_ENTRIES_PER_SHARD if entries_per_shard is None else entries_per_shard
    if entries_per_shard < 1:
        raise BankError(f"entries_per_shard must be at least 1; got {entries_per_shard}")
    if (directory / MANIFEST).exists():
        raise BankError(f"{directory} already holds a bank ({MANIFEST}); export into a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    with open_store(source_uri) as store:  # a bad URI fails here, before any worker starts
        authenticated = store.authenticated
        # Keys only: the scan reads no value. The values are read by the shards' workers.
        shards = list(_chunks((key for key, _ in store.scan()), entries_per_shard))
    tasks = [(keys, directory / f"shard-{index:05d}.parquet") for index, keys in enumerate(shards)]
    records = map_shards(lambda task: write_shard(source_uri, *task), tasks)
    manifest = Manifest(authenticated, records, redact(source_uri))
    (directory / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1) + "\n")
    return manifest


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise BankError(f"{path} is not an ekd bank of format {FORMAT}: format {data.get('format')!r}")
        return Manifest(
            authenticated=bool(data["authenticated"]),
            shards=[ShardRecord(**shard) for shard in data["shards"]],
            source=data.get("source", ""),
        )
    except OSError as error:
        raise BankError(f"no bank in {directory}: cannot read {MANIFEST} ({error.strerror})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise BankError(f"{path} is damaged: {type(error).__name__}: {error}") from None


@dataclass(frozen=True)
class Restamping:
    """How an import treats tags: verify under the secret `source` (None: an untagged bank), then tag under
    `target` (None: write frames alone). Secrets, not authenticators, so that it pickles to the workers."""

    source: bytes | None
    target: bytes | None

    def restamped(self, pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | int:
        """The (key, value) pairs to write for stored ones, or how many have no valid tag."""
        if self.source is None:
            return pairs
        source = ValueAuthenticator(self.source)
        target = ValueAuthenticator(self.target) if self.target is not None else None
        written, forged = [], 0
        for key, stored in pairs:
            frame = source.verified_frame(key, stored)
            if frame is None:
                forged += 1
            else:
                written.append((key, target.sign(key, bytes(frame)) if target else bytes(frame)))
        return forged if forged else written


def _checked_rows(path: Path, record: ShardRecord) -> tuple[list[bytes], list[bytes]] | str:
    """The shard's keys and values, or what is wrong with it."""
    try:
        found = _sha256(path)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if found != record.sha256:
        return f"sha256 {found[:12]}… is not the manifest's {record.sha256[:12]}…"
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        return f"is not a readable Parquet file ({error})"
    if table.schema.names != _SCHEMA.names or table.num_rows != record.entries:
        return (
            f"holds {table.num_rows} rows of columns {table.schema.names}, "
            f"not {record.entries} keys and values"
        )
    return table.column("key").to_pylist(), table.column("value").to_pylist()


def import_shard(
    directory: Path, record: ShardRecord, target_uri: str, restamping: Restamping
) -> ShardImported:
    """Check one shard whole, then write it into the store at `target_uri`."""
    rows = _checked_rows(directory / record.file, record)
    if isinstance(rows, str):
        return ShardImported(record.file, 0, rows)
    items = restamping.restamped(list(zip(*rows, strict=True)))
    if isinstance(items, int):
        return ShardImported(
            record.file, 0, f"{items} of its values have no valid HMAC tag under the exporter's secret"
        )
    with open_store(target_uri, hmac_key=None) as store:
        for start in range(0, len(items), _STEP):
            store.write_stored(items[start : start + _STEP])
    return ShardImported(record.file, len(items))


def read_secret(path: Path) -> bytes:
    """The exporter's HMAC secret from a file (one trailing newline dropped), for `import_bank`."""
    try:
        secret = path.read_bytes().removesuffix(b"\n")
    except OSError as error:
        raise BankError(f"cannot read the exporter's HMAC secret from {path}: {error.strerror}") from None
    if len(secret) < MIN_KEY_BYTES:
        raise BankError(
            f"the exporter's HMAC secret in {path} has {len(secret)} bytes; it has at least {MIN_KEY_BYTES}"
        )
    return secret


def import_bank(
    directory: Path,
    target_uri: str,
    map_shards: MapShards,
    *,
    source_hmac_key: bytes | None = None,
) -> list[ShardImported]:
    """Import the bank in `directory` into the store at `target_uri`, shards run by `map_shards`; per shard,
    what was written or why it was not (the module doc says what is checked). `source_hmac_key` is the
    exporter's secret when it is not the importing store's own."""
    manifest = read_manifest(directory)
    open_store(target_uri).close()  # a bad URI fails here, before any worker starts
    target_key = hmac_key_from_environment()  # the importing store's secret, as open_store takes it
    if not manifest.authenticated and target_key is not None:
        raise BankError(
            f"the bank in {directory} carries no HMAC tags and {redact(target_uri)} accepts only tagged "
            "values: export from a store with the secret, or import into one without it"
        )
    source = None
    if manifest.authenticated:
        if source_hmac_key is None and target_key is None:
            raise BankError(
                f"the bank in {directory} is HMAC-tagged: give the exporter's secret "
                "(--source-hmac-key-file) to verify it"
            )
        source = source_hmac_key if source_hmac_key is not None else target_key
    restamping = Restamping(source, target_key)
    return map_shards(lambda record: import_shard(directory, record, target_uri, restamping), manifest.shards)
