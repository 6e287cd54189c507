"""Item categories from an attribute file, for diverse aggregation and its evaluation.

Two inputs are read:

- JSON (optionally gzipped), `{"item_id": [attribute, ...]}` as in the Amazon releases'
  `*_item2attributes.json` (a single value instead of a list is fine too). An item with several
  attributes gets the one carried by the most items of the file (ties: the one listed first). In
  Amazon Beauty the attributes mix brands and a category path (Makeup > Face > Foundation); the
  most widely shared one is the top of the path, so Beauty's 12,101 items fall into 7 categories.
- CSV (optionally gzipped) with an item column and a category column (one category per item;
  an item listed twice keeps its first row).

Catalogue items the file does not mention get category -1 ("none"); padding row 0 always does.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import DataError, read_csv_strings

NO_CATEGORY = -1


@dataclass(frozen=True)
class ItemCategories:
    """One category per catalogue row, as ids into `names`."""

    rows: np.ndarray  # (N,) int32, NO_CATEGORY for row 0 and for items the file lacks
    names: list[str]
    source: str
    rule: str

    def summary(self) -> dict:
        known = self.rows[1:] >= 0
        return {
            "source": self.source,
            "rule": self.rule,
            "categories": len(self.names),
            "items_with_category": int(known.sum()),
            "items_without_category": int((~known).sum()),
        }


def read_categories(
    path: Path,
    item_ids: list[str | None],
    item_col: str = "item_id",
    category_col: str = "category",
) -> ItemCategories:
    """Categories of a catalogue (row -> external id, row 0 padding) from a JSON or CSV file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: category file not found")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".json"):
        per_item, rule = _from_attributes(path), "most frequent attribute of the item in the file"
    elif name.endswith(".csv"):
        per_item, rule = _from_csv(path, item_col, category_col), f"CSV column {category_col!r}"
    else:
        raise DataError(f"{path}: category files are .json or .csv (optionally .gz)")
    # The catalogue's categories: a category only items outside it have is none of its own.
    names = sorted({per_item[item] for item in item_ids if item is not None and item in per_item})
    code = {category: i for i, category in enumerate(names)}
    rows = np.full(len(item_ids), NO_CATEGORY, dtype=np.int32)
    for row, item in enumerate(item_ids):
        if item is not None and item in per_item:
            rows[row] = code[per_item[item]]
    if not (rows >= 0).any():
        raise DataError(f"{path}: none of the catalogue's item ids has a category there")
    return ItemCategories(rows, names, str(path), rule)


def _from_attributes(path: Path) -> dict[str, str]:
    try:
        opener = gzip.open if path.suffix.lower() == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig") as f:  # a BOM, as CSV files may have
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object {{item_id: [attributes]}}")
    lists: dict[str, list] = {}
    for key, value in data.items():
        # null: no attribute; a nested list or object became a category named "[1]"
        values = [a for a in (value if isinstance(value, list) else [value]) if a is not None]
        # Whole floats (3.0: pandas writes integer ids so beside a missing value) are numbers.
        values = [int(a) if isinstance(a, float) and a.is_integer() else a for a in values]
        if odd := [a for a in values if isinstance(a, bool) or not isinstance(a, str | int)]:
            raise DataError(
                f"{path}: item {key!r}: attributes are strings or whole numbers, not {odd[0]!r}"
            )
        lists[str(key)] = values
    spread = Counter(str(a) for attributes in lists.values() for a in set(map(str, attributes)))
    chosen = {}
    for item, attributes in lists.items():
        if attributes:
            # max keeps the first of equally spread attributes
            chosen[item] = max(map(str, attributes), key=lambda a: spread[a])
    return chosen


def _from_csv(path: Path, item_col: str, category_col: str) -> dict[str, str]:
    try:
        frame = read_csv_strings(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read CSV: {exc}") from None
    missing = [c for c in (item_col, category_col) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; columns are {list(frame.columns)}")
    frame = frame[frame[category_col] != ""].drop_duplicates(item_col, keep="first")
    return dict(zip(frame[item_col], frame[category_col], strict=True))
