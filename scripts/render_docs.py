"""Render the settings tables in docs/*.md from the settings classes themselves.

    python scripts/render_docs.py           # rewrite the tables in place
    python scripts/render_docs.py --check   # exit 1 if a table is out of date (tests run this)

A table lives between `<!-- settings:NAME -->` and `<!-- /settings:NAME -->` in a docs page;
everything else in the page is left alone. The tables come from the service's `Settings`
(pydantic field descriptions) and the training config dataclasses (field docstrings, with the
flags `remi-train` declares for them), so the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import typer

from service.settings import Settings
from training.cli import app
from training.commands.options import FLAGS, field_default, field_docs
from training.config import TrainConfig
from training.data import DataConfig
from training.export import ExportConfig
from training.nightly.config import NightlyConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
typer.main.get_command(app)  # reads every command's options, so FLAGS knows all their flags


def _value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if str(value) else '`""`'


def service_table() -> list[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.default
        lines.append(f"| `{prefix}{name.upper()}` | {_value(default)} | {info.description} |")
    return lines


def config_table(cls: type, section: str, skip: tuple[str, ...] = ()) -> list[str]:
    docs = field_docs(cls)
    lines = [f"| `{section}:` key | flag | default | meaning |", "|---|---|---|---|"]
    for spec in dataclasses.fields(cls):
        if spec.name in skip:
            continue
        flags = " ".join(f"`{flag}`" for flag in FLAGS.get((cls, spec.name), ()))
        default = field_default(cls, spec.name)
        lines.append(f"| `{spec.name}` | {flags} | {_value(default)} | {docs[spec.name]} |")
    return lines


TABLES = {
    "service": service_table,
    "data": lambda: config_table(DataConfig, "data"),
    "train": lambda: config_table(TrainConfig, "train"),
    "export": lambda: config_table(ExportConfig, "export"),
    "nightly": lambda: config_table(NightlyConfig, "nightly", skip=("data", "train")),
}


def render(text: str) -> str:
    def table(match: re.Match) -> str:
        name = match.group(1)
        body = "\n".join(TABLES[name]())
        return f"<!-- settings:{name} -->\n{body}\n<!-- /settings:{name} -->"

    return re.sub(r"<!-- settings:(\w+) -->.*?<!-- /settings:\1 -->", table, text, flags=re.S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args()
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        rendered = render(text)
        if rendered != text:
            stale.append(page)
            if not args.check:
                page.write_text(rendered)
    if args.check and stale:
        names = ", ".join(str(p.relative_to(DOCS.parent)) for p in stale)
        print(f"out of date: {names}; run python scripts/render_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
