"""Rewrite the results table of a markdown file from a run's results.json.

    python scripts/render_results.py runs/demo/results.json docs/results.md

The file marks each generated table with the run it comes from:

    <!-- results:BEGIN source=runs/demo/results.json -->
    ...
    <!-- results:END -->

Every block whose source is the given results.json is replaced by one table row per experiment and seed,
the columns of `ekd demo`'s table; the rest of the file is left as it is. Reads the JSON that
`trainer.results.report.write_results_json` writes, with the standard library only, so any Python 3.11 runs
it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

BEGIN = re.compile(r"^<!-- results:BEGIN source=(?P<source>\S+) -->$")
END = "<!-- results:END -->"
REQUIRED_FIELDS = {"method", "name", "student_params", "test_accuracy", "seconds"}
COLUMNS = (
    ("method", "---"),
    ("experiment", "---"),
    ("student params", "---:"),
    ("test accuracy", "---:"),
    ("teacher calls", "---:"),
    ("cache hit rate", "---:"),
    ("wall time (s)", "---:"),
)


class RenderError(Exception):
    """The results or the markdown file cannot be rendered; the message says why."""


def hit_rate(counters: dict) -> float | None:
    """Cache hits over every cache lookup of the run; None when it looked nothing up (no teachers)."""
    hits = counters.get("cache_hits", 0)
    lookups = hits + counters.get("cache_misses", 0)
    return hits / lookups if lookups else None


def table_row(result: dict) -> str:
    counters = result.get("counters", {})
    rate = hit_rate(counters)
    cells = (
        result["method"],
        result["name"],
        f"{result['student_params']:,}",
        f"{result['test_accuracy']:.2%}",
        # A method without teachers makes no calls to make: a dash, not a zero that reads like a cache win.
        str(int(counters.get("teacher_calls", 0))) if result.get("teachers") else "—",
        f"{rate:.1%}" if rate is not None else "—",
        f"{result['seconds']:.0f}",
    )
    return "| " + " | ".join(cells) + " |"


def results_table(results: list[dict]) -> list[str]:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join(align for _, align in COLUMNS) + "|"
    return [header, rule, *(table_row(r) for r in results)]


def load_results(path: Path) -> list[dict]:
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RenderError(f"{path}: cannot read results ({error})") from error
    if not results or not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise RenderError(f"{path}: expected a list of experiment results, as `ekd distill`/`ekd demo` write")
    for index, result in enumerate(results):
        if missing := REQUIRED_FIELDS - result.keys():
            raise RenderError(f"{path}: result {index} lacks {', '.join(sorted(missing))}")
    return results


def same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def render(markdown: str, source: str, table: list[str]) -> tuple[str, int]:
    """`markdown` with every block whose source is `source` holding `table`, and the number of blocks."""
    lines = markdown.splitlines()
    out: list[str] = []
    replaced = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        begin = BEGIN.match(line.strip())
        if begin is None:
            continue
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == END), None)
        if end is None:
            raise RenderError(f"a results block (source={begin['source']}) has no {END}")
        if not same_path(begin["source"], source):
            continue
        # Blank lines around the table, so that neither marker is read as part of it.
        out.extend(["", *table, ""])
        i = end
        replaced += 1
    return "\n".join(out) + ("\n" if markdown.endswith("\n") else ""), replaced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a run's results.json, e.g. runs/demo/results.json")
    parser.add_argument("markdown", type=Path, help="the markdown file to update, e.g. docs/results.md")
    args = parser.parse_args(argv)
    try:
        table = results_table(load_results(Path(args.results)))
        text, replaced = render(args.markdown.read_text(), args.results, table)
        if replaced == 0:
            raise RenderError(
                f"{args.markdown}: no block <!-- results:BEGIN source={args.results} --> to rewrite"
            )
    except (RenderError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.markdown.write_text(text)
    print(f"{args.markdown}: {replaced} table(s) from {args.results}, {len(table) - 2} row(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
