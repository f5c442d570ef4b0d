"""Corrupt cache values do not flood the log: a process that logs the way `ekd` does (rich lines on stderr)
reads a real LMDB cache planted with damaged, forged and wrong-kind values, a batch at a time as a trainer
does, and its stderr says so in a bounded number of lines whose counts add up to every value planted."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import pytest

from services.cache.corrupt_values import REPORT_INTERVAL_SECONDS

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

PLANTED = 3072  # a multiple of 3 kinds and of BATCH
BATCH = 64

_READER_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from services.cache import ValueSpec, open_store, output_key
    from services.cache.authentication import ValueAuthenticator
    from services.formats.codec import encode_value
    from trainer.cli.main import main_options

    main_options(verbose=0, debug=False, version=False)  # ekd's logging
    path, planted, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    secret = b"correct horse battery staple 0123"
    sign = ValueAuthenticator(secret).sign
    keys = [output_key("f" * 64, "logits", "float16", 0, i.to_bytes(16, "big")) for i in range(planted)]
    bad = {
        0: lambda key: encode_value(torch.zeros(10, dtype=torch.float16)),  # forged: no tag
        1: lambda key: sign(key, b"not a frame at all"),  # damaged
        2: lambda key: sign(key, encode_value(torch.zeros(3, dtype=torch.float16))),  # of the wrong kind
    }
    with open_store(path, hmac_key=secret) as store:
        store._put_raw([(key, bad[i % 3](key)) for i, key in enumerate(keys)])
        spec = ValueSpec.full("float16", (10,))
        for start in range(0, planted, batch):
            assert store.get_many(keys[start : start + batch], [spec] * batch) == [None] * batch
        print(store.stats.corrupt, flush=True)
    """
)


def test_thousands_of_corrupt_values_log_a_few_lines_that_count_them_all(tmp_path):
    started = time.monotonic()
    reader = subprocess.run(
        [sys.executable, "-c", _READER_PROCESS, str(tmp_path / "cache"), str(PLANTED), str(BATCH)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - started
    assert reader.returncode == 0, reader.stderr
    assert int(reader.stdout) == PLANTED
    lines = reader.stderr.splitlines()
    said = " ".join(reader.stderr.split())  # log lines come wrapped to the terminal's width
    reports = re.findall(r"deleted (\d+) corrupt cache values? \(([^)]*)\)", said)
    # The first value at once, then one line per interval at most, and the rest at exit.
    assert 1 <= len(reports) <= 2 + seconds / REPORT_INTERVAL_SECONDS
    assert sum(int(total) for total, _ in reports) == PLANTED
    kinds: dict[str, int] = {}
    for _, counts in reports:
        for count, kind in re.findall(r"(\d+) ([a-z ]+?)(?:,|$)", counts):
            kinds[kind] = kinds.get(kind, 0) + int(count)
    assert kinds == {"forged": PLANTED // 3, "damaged": PLANTED // 3, "of the wrong kind": PLANTED // 3}
    assert len(lines) <= 4 * len(reports), reader.stderr
