"""The docs: generated settings tables are up to date, and relative links point at files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_settings_tables_match_the_settings_classes():
    run = subprocess.run(
        [sys.executable, "scripts/render_docs.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr


def test_every_setting_of_the_classes_is_in_a_table():
    from service.settings import Settings
    from training.config import TrainConfig

    serving = (REPO / "docs" / "serving.md").read_text()
    training = (REPO / "docs" / "training.md").read_text()
    assert all(f"`REMI_{name.upper()}`" in serving for name in Settings.model_fields)
    assert all(f"| `{name}` |" in training for name in TrainConfig.__dataclass_fields__)


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def headings(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as
    hyphens (headings inside code blocks are not headings)."""
    anchors, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_code_blocks_close_and_anchors_name_headings():
    # One unclosed block in serving.md turned the rest of the page inside out (its headings
    # into code), and with them 18 links into it.
    unclosed = [p.name for p in PAGES if sum(
        line.lstrip().startswith("```") for line in p.read_text().splitlines()) % 2]  # fmt: skip
    assert not unclosed, unclosed
    anchors = {page.resolve(): headings(page) for page in PAGES}
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text()):
            resolved = (page.parent / target).resolve() if target else page.resolve()
            if resolved in anchors and anchor not in anchors[resolved]:
                broken.append(f"{page.relative_to(REPO)} -> {target}#{anchor}")
    assert not broken, broken


def test_readme_stays_short_and_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert 8_000 < len(text.encode()) < 16_000
    head = text[:400]
    assert "bash scripts/quickstart.sh" in head and "bash scripts/test.sh" in head
