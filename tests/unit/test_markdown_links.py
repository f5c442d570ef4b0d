"""Every relative link of the repository's markdown files leads to a file or folder that exists."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

REPO_ROOT = Path(__file__).resolve().parents[2]
# Environments, caches and run outputs: generated, not the project's words.
SKIPPED_DIRS = {".git", "runs", ".cache", ".pytest_cache", ".ruff_cache", "__pycache__", "node_modules"}
SKIPPED_PREFIXES = (".venv",)
EXTERNAL = ("http://", "https://", "mailto:")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[^\S\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
# [text](target) and ![alt](target), the target optionally followed by a quoted title.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(SKIPPED_PREFIXES)]
        found.extend(Path(folder) / name for name in files if name.endswith(".md"))
    return sorted(found)


def relative_links(markdown: str) -> list[str]:
    """The link targets of `markdown` that name a path (an anchor after it dropped), outside code."""
    prose = CODE_SPAN.sub("", FENCE.sub("", markdown))
    targets = []
    for target in LINK.findall(prose):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        targets.append(unquote(target.split("#", 1)[0]))
    return targets


def resolve(md_file: Path, target: str) -> Path:
    # A leading / is the repository root, as on the forge that renders these files.
    return REPO_ROOT / target.lstrip("/") if target.startswith("/") else md_file.parent / target


def test_links_are_found_outside_code_only() -> None:
    text = (
        'See [the guide](docs/a.md#setup), ![plot](img/p.png "title"), [web](https://x.org), '
        "[mail](mailto:a@b.c), [here](#usage) and `[not](code.md)`.\n\n```\n[neither](fenced.md)\n```\n"
    )

    assert relative_links(text) == ["docs/a.md", "img/p.png"]


def test_every_relative_link_resolves() -> None:
    files = markdown_files(REPO_ROOT)
    assert REPO_ROOT / "README.md" in files

    broken = [
        f"{md.relative_to(REPO_ROOT)}: ({target})"
        for md in files
        for target in relative_links(md.read_text(encoding="utf-8"))
        if not resolve(md, target).exists()
    ]

    assert broken == []
