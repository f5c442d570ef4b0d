"""Bytes per view all-in: what one soft-label entry costs a bank, key, value and the store's own overhead,
measured on stores holding N entries (100,000 by default) of one form each.

For each form (compact, quantized, fp16 logits; 1000 classes) it writes N entries of
benchmarks/soft_labels.py's long-tailed logits under their real keys (`services.cache.layout`, random input
digests, 1,000 a batch as the bank writer writes them) through ekd's stores, then reads the stores' own
accounting:

- LMDB: the pages in use (branch, leaf and overflow pages, `env.stat()`) × the page size, over N, as written
  (keys arrive in hash order, so B-tree pages are split part-full) and packed (`ekd cache pack`: copied in
  key order, pages full);
- Redis (a private redis-server on a free port, configured as ekd's deployments configure it): the rise of
  INFO used_memory over N, and MEMORY USAGE of a sample of 1,000 entries (the server's own per-key count,
  without the hash table's slot of ~8-16 bytes; a compact entry's share of its hash bucket).

Compact entries live in Redis several to a hash bucket (`services.cache.layout`): 65,536 buckets per teacher,
which ImageNet's 20.5 M views of a teacher (16 views) fill to about 313 entries each. N random digests would
leave 1-2 entries a bucket, the density of a bank 200 times smaller than ImageNet's; so the compact entries'
keys are real keys of `PER_BUCKET` entries a bucket (the hash's bucket bytes drawn from N / 313 buckets, its
other bytes random), as a full ImageNet bank holds them.

and what `ekd cache stats` reports for them (`services.cache.inventory`: the same accounting on a sample).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bank_bytes.py [--entries 100000] [--json FILE]
    [--readme benchmarks/README.md --readme docs/soft_label_bank.md]   # or --render FILE to re-render
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import redis
import torch
from rich.console import Console
from rich.table import Table
from soft_labels import IDENTITY, long_tailed_logits  # benchmarks/ is the script's folder, first on sys.path

from services.cache import COMPACT, FULL, QUANTIZED, CachedValue, OutputEntries, open_store
from services.cache.inventory import inventory
from services.cache.layout import BUCKET_HASH_BYTES, BUCKET_KEY_LENGTH
from services.cache.lmdb_store import LmdbStore
from services.cache.local_redis import running_redis_server
from services.formats.quantized_logits import quantized
from services.formats.soft_labels import CompactLogits, compress

REPO = Path(__file__).resolve().parents[1]
BATCH = 1000
SAMPLED_KEYS = 1000
IMAGENET_VIEWS_PER_TEACHER = 1_281_167 * 16
PER_BUCKET = round(IMAGENET_VIEWS_PER_TEACHER / 2 ** (8 * BUCKET_HASH_BYTES))
README_BEGIN = "<!-- bank_bytes:BEGIN -->"
README_END = "<!-- bank_bytes:END -->"


def rows_of(compact: CompactLogits) -> list[CachedValue]:
    return [compact[row] for row in range(len(compact))]


FORMS: dict[str, tuple[str, Callable[[torch.Tensor], list[CachedValue]]]] = {
    "compact": (COMPACT, lambda logits: rows_of(compress(logits))),
    "quantized": (QUANTIZED, lambda logits: list(quantized(logits))),
    "fp16 logits": (FULL, lambda logits: list(logits.half())),
}


def batches(entries: int, form: str) -> Iterator[tuple[list[bytes], list[CachedValue]]]:
    """The form's entries in writer-sized batches, made as they are written (a bank's worth would not fit
    memory): keys of random input digests and their values."""
    digests = random.Random(0)
    keyed = OutputEntries.of(IDENTITY, "logits", "float16", logits_form=FORMS[form][0])
    buckets = max(1, round(entries / PER_BUCKET))
    for start in range(0, entries, BATCH):
        count = min(BATCH, entries - start)
        teacher, _ = long_tailed_logits(count, seed=start)
        keys = keyed.keys([digests.randbytes(16) for _ in range(count)])
        if FORMS[form][0] == COMPACT:  # at ImageNet's density a bucket (the module doc): its 2 bytes replaced
            start_of_bucket_bytes = BUCKET_KEY_LENGTH - BUCKET_HASH_BYTES
            keys = [
                key[:start_of_bucket_bytes]
                + digests.randrange(buckets).to_bytes(BUCKET_HASH_BYTES, "big")
                + key[BUCKET_KEY_LENGTH:]
                for key in keys
            ]
        yield keys, FORMS[form][1](teacher)


def lmdb_pages_bytes(path: Path) -> int:
    with lmdb.open(str(path), readonly=True, lock=False) as env:
        stat = env.stat()
        return (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * stat["psize"]


def measure(entries: int, form: str, directory: Path, server_url: str) -> dict:
    path = directory / f"lmdb-{form}"
    client = redis.Redis.from_url(server_url)
    client.flushall()
    before = int(client.info("memory")["used_memory"])
    all_keys = []
    # A loaded machine may answer a pipeline of 1,000 2-KB SETs slower than the stores' 0.25 s default.
    patient_url = f"{server_url}?socket_timeout=30"
    with open_store(str(path)) as lmdb_store, open_store(patient_url) as redis_store:
        for keys, values in batches(entries, form):
            lmdb_store.put_many(list(zip(keys, values, strict=True)))
            redis_store.put_many(list(zip(keys, values, strict=True)))
            all_keys += keys
        value_bytes = sum(size for _, size in lmdb_store.scan())
        # What `ekd cache stats` reports for the group: the stores' own all-in count.
        stats_lmdb, stats_redis = (inventory(store)[0][0].all_in_bytes for store in (lmdb_store, redis_store))
    used = int(client.info("memory")["used_memory"]) - before
    key_bytes = sum(len(key) for key in all_keys)
    packed = directory / f"lmdb-{form}-packed"
    with LmdbStore(path, readonly=True) as written:
        written.copy_packed(packed)  # `ekd cache pack`
    sample = random.Random(1).sample(all_keys, min(SAMPLED_KEYS, len(all_keys)))
    with open_store(patient_url) as redis_store:
        (usage,) = redis_store.entry_bytes([[(key, 0) for key in sample]])
        assert redis_store.get_many(sample).count(None) == 0, "an entry written is missing from Redis"
    client.close()
    return {
        "form": form,
        "entries": entries,
        "key_bytes": key_bytes / entries,
        "value_bytes": value_bytes / entries,
        "lmdb_as_written": lmdb_pages_bytes(path) / entries,
        "lmdb_packed": lmdb_pages_bytes(packed) / entries,
        "redis_used_memory": used / entries,
        "redis_memory_usage": usage,
        "stats_lmdb": stats_lmdb,
        "stats_redis": stats_redis,
    }


HEADERS = (
    "form",
    "key B",
    "value B",
    "LMDB as written B",
    "LMDB packed B",
    "Redis used_memory B",
    "Redis MEMORY USAGE B",
    "ekd cache stats: LMDB / Redis B",
)


def rows(results: list[dict]) -> list[list[str]]:
    return [
        [
            r["form"],
            f"{r['key_bytes']:.0f}",
            f"{r['value_bytes']:,.0f}",
            f"{r['lmdb_as_written']:,.0f}",
            f"{r['lmdb_packed']:,.0f}",
            f"{r['redis_used_memory']:,.0f}",
            f"{r['redis_memory_usage']:,.0f}",
            f"{r['stats_lmdb']:,.0f} / {r['stats_redis']:,.0f}",
        ]
        for r in results
    ]


def markdown(report: dict) -> str:
    lines = [
        f"All-in bytes per entry, 1000 classes, {report['entries']:,} entries per form and store "
        f"(`benchmarks/bank_bytes.py`, {report['date']}, redis-server {report['redis_version']}):",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" if n == 0 else "---:" for n in range(len(HEADERS))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(report["results"])]
    return "\n".join(lines)


def write_into_readme(report: dict, readme: Path) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} block to write the table into")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_BEGIN}\n{markdown(report)}\n{README_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000, help="entries per form and store")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--readme", type=Path, action="append", default=[], help="write the table into")
    parser.add_argument("--render", type=Path, help="only write a --json file's table into each --readme")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
    else:
        results = []
        with (
            tempfile.TemporaryDirectory() as directory,
            running_redis_server(Path(directory) / "redis") as server,
        ):
            version = redis.Redis.from_url(server.url).info("server")["redis_version"]
            for form in args.forms.split(","):
                results.append(measure(args.entries, form, Path(directory), server.url))
        report = {
            "entries": args.entries,
            "date": time.strftime("%Y-%m-%d"),
            "redis_version": version,
            "results": results,
        }
    table = Table(title=f"all-in bytes per entry ({report['entries']:,} entries per form and store)")
    for n, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if n == 0 else "right")
    for row in rows(report["results"]):
        table.add_row(*row)
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    for readme in args.readme:
        write_into_readme(report, readme)


if __name__ == "__main__":
    main()
