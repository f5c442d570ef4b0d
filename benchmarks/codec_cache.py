"""Codec and cache speed, measured side by side in one run (ratios, because these machines are noisy).

- codec: encode_value + decode_value MB/s ÷ a plain memory copy (torch.clone) MB/s of the same tensor;
- cache: get_many / put_many values per second for LMDB and Redis at 4 KB (logits) and 200 KB (a feature map).

Run: .venv/bin/python benchmarks/codec_cache.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _timing import rate  # benchmarks/ is the script's folder, first on sys.path
from rich.console import Console
from rich.table import Table

from services.cache import input_digests, open_store, output_key
from services.cache.local_redis import running_redis_server
from services.formats.codec import decode_value, encode_value

SIZES = {"4 KB (logits)": 2048, "200 KB (feature map)": 100 * 1024}  # fp16 elements
BATCH = 64


def codec_rows(seconds: float) -> list[tuple[str, float, float]]:
    rows = []
    for label, elements in SIZES.items():
        t = torch.randn(elements).half()
        nbytes = t.numel() * t.element_size()
        codec = rate(lambda: (decode_value(encode_value(t)), nbytes)[1], seconds) / 1e6
        copy = rate(lambda: (t.clone(), nbytes)[1], seconds) / 1e6
        rows.append((label, codec, copy))
    return rows


def cache_rows(uri: str, seconds: float) -> list[tuple[str, float, float]]:
    rows = []
    with open_store(uri) as store:
        for label, elements in SIZES.items():
            images = torch.randint(0, 256, (BATCH, 3, 16, 16), dtype=torch.uint8)
            keys = [output_key("bench", label, "float16", 0, d) for d in input_digests(images)]
            values = [torch.randn(elements).half() for _ in keys]
            puts = rate(lambda: (store.put_many(list(zip(keys, values))), len(keys))[1], seconds)
            gets = rate(lambda: (store.get_many(keys), len(keys))[1], seconds)
            rows.append((label, puts, gets))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure")
    args = parser.parse_args()
    console = Console()
    torch.set_num_threads(1)

    table = Table(title="codec: encode+decode vs memory copy (one thread)")
    for column in ("value", "codec MB/s", "copy MB/s", "codec ÷ copy"):
        table.add_column(column, justify="right")
    for label, codec, copy in codec_rows(args.seconds):
        table.add_row(label, f"{codec:,.0f}", f"{copy:,.0f}", f"{codec / copy:.2f}")
    console.print(table)

    table = Table(title=f"cache: values per second, batches of {BATCH}")
    for column in ("store", "value", "put/s", "get/s", "LMDB get ÷ Redis get"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp, running_redis_server(Path(tmp) / "redis") as redis_server:
        lmdb = cache_rows(f"lmdb://{tmp}/lmdb", args.seconds)
        redis = cache_rows(redis_server.url, args.seconds)
        for (label, lput, lget), (_, rput, rget) in zip(lmdb, redis):
            table.add_row("lmdb", label, f"{lput:,.0f}", f"{lget:,.0f}", f"{lget / rget:.2f}")
            table.add_row("redis", label, f"{rput:,.0f}", f"{rget:,.0f}", "")
    console.print(table)


if __name__ == "__main__":
    main()
