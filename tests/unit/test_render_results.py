"""scripts/render_results.py: a run's results.json becomes the table between a markdown file's markers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer.results.report import write_results_json
from trainer.runs.experiment import ExperimentResult, TeacherSummary

REPO_ROOT = Path(__file__).resolve().parents[2]
RENDER = REPO_ROOT / "scripts" / "render_results.py"


def result(name: str, method: str, params: int, accuracy: float, seconds: float, **kw) -> ExperimentResult:
    return ExperimentResult(
        name=name,
        method=method,
        seed=0,
        test_accuracy=accuracy,
        val_accuracy=None,
        student_params=params,
        teachers=kw.get("teachers", []),
        students=[],
        seconds=seconds,
        stall_seconds=0.0,
        run_dir=f"runs/{name}",
        counters=kw.get("counters", {}),
    )


def write_run(path: Path) -> Path:
    teacher = TeacherSummary("cifar_resnet56", 861_620, 0.981)
    return write_results_json(
        [
            result(
                "digits-kd",
                "kd",
                78_042,
                0.98056,
                82.4,
                teachers=[teacher],
                counters={"teacher_calls": 160, "cache_hits": 811, "cache_misses": 189},
            ),
            result(
                "digits-ekd",
                "ekd",
                150_948,
                0.99167,
                83.0,
                teachers=[teacher],
                counters={"teacher_calls": 0, "cache_hits": 1000, "cache_misses": 0},
            ),
            result("digits-okd", "okd", 171_000, 0.98611, 52.6),
        ],
        path,
    )


def render(results: Path, markdown: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RENDER), str(results), str(markdown)], capture_output=True, text=True
    )


def test_the_block_naming_the_run_gets_its_table_and_the_rest_stays(tmp_path: Path) -> None:
    results = write_run(tmp_path / "runs" / "demo" / "results.json")
    other = tmp_path / "other.json"
    markdown = tmp_path / "results.md"
    markdown.write_text(
        "# Results\n\nRegenerate with the renderer.\n\n"
        f"<!-- results:BEGIN source={results} -->\n| stale | table |\n|---|---|\n<!-- results:END -->\n\n"
        f"<!-- results:BEGIN source={other} -->\nanother run's table\n<!-- results:END -->\n\nThe end.\n"
    )

    rendered = render(results, markdown)

    assert rendered.returncode == 0, rendered.stderr
    assert markdown.read_text() == (
        "# Results\n\nRegenerate with the renderer.\n\n"
        f"<!-- results:BEGIN source={results} -->\n\n"
        "| method | experiment | student params | test accuracy | teacher calls | cache hit rate "
        "| wall time (s) |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
        "| kd | digits-kd | 78,042 | 98.06% | 160 | 81.1% | 82 |\n"
        "| ekd | digits-ekd | 150,948 | 99.17% | 0 | 100.0% | 83 |\n"
        "| okd | digits-okd | 171,000 | 98.61% | — | — | 53 |\n"
        "\n<!-- results:END -->\n\n"
        f"<!-- results:BEGIN source={other} -->\nanother run's table\n<!-- results:END -->\n\nThe end.\n"
    )


def test_rendering_twice_changes_nothing(tmp_path: Path) -> None:
    results = write_run(tmp_path / "results.json")
    markdown = tmp_path / "results.md"
    markdown.write_text(f"<!-- results:BEGIN source={results} -->\n<!-- results:END -->\n")
    assert render(results, markdown).returncode == 0
    once = markdown.read_text()

    assert render(results, markdown).returncode == 0

    assert markdown.read_text() == once


def test_a_file_without_a_block_for_the_run_is_an_error_and_left_alone(tmp_path: Path) -> None:
    results = write_run(tmp_path / "results.json")
    markdown = tmp_path / "results.md"
    text = "<!-- results:BEGIN source=runs/elsewhere/results.json -->\nkept\n<!-- results:END -->\n"
    markdown.write_text(text)

    rendered = render(results, markdown)

    assert rendered.returncode == 2
    assert f"no block <!-- results:BEGIN source={results} -->" in rendered.stderr
    assert markdown.read_text() == text


def test_a_block_without_its_end_marker_is_an_error(tmp_path: Path) -> None:
    results = write_run(tmp_path / "results.json")
    markdown = tmp_path / "results.md"
    markdown.write_text(f"<!-- results:BEGIN source={results} -->\n| old |\n")

    rendered = render(results, markdown)

    assert rendered.returncode == 2
    assert "has no <!-- results:END -->" in rendered.stderr


def test_the_docs_demo_table_is_in_the_renderers_form() -> None:
    """docs/results.md's demo table is exactly what the renderer writes, so rendering a fresh run only
    changes the figures."""
    docs = (REPO_ROOT / "docs" / "results.md").read_text().splitlines()
    begin = docs.index("<!-- results:BEGIN source=runs/demo/results.json -->")
    end = docs.index("<!-- results:END -->", begin)
    block = docs[begin + 1 : end]

    assert block[0] == "" and block[-1] == ""
    assert block[1:3] == [
        "| method | experiment | student params | test accuracy | teacher calls | cache hit rate "
        "| wall time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    assert all(row.startswith("| ") and row.count(" | ") == 6 for row in block[3:-1])
