"""Commands for published bundles: list the versions, roll back to one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from remi_core.bundle import (
    BundleError,
    check_current_is_a_link,
    current_version,
    list_versions,
    load_bundle,
    read_manifest,
    set_current,
)
from training.commands.nightly import BundleRootOpt
from training.commands.options import CliError, echo_json
from training.data import SequenceDataset
from training.evaluate import evaluate_bundle

SAME_USERS = "same_users_recall@50"


def versions(
    bundle_root: BundleRootOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    dataset_dir: Annotated[
        Path | None,
        typer.Option(
            "--dataset-dir",
            help="Also score every version on this dataset's test users (e.g. a nightly run's "
            "<state-dir>/runs/<id>/dataset), so the versions can be compared.",
        ),
    ] = None,
) -> None:
    """List bundle versions, oldest first; `*` marks the one `current` points at.

    Each version's own test Recall@50 was measured on the users of its own night, which change
    with the data; with --dataset-dir every version is also scored on the same users.
    """
    if not bundle_root.is_dir():
        raise CliError(f"--bundle-root: {bundle_root} is not a directory")
    if dataset_dir is not None and not dataset_dir.is_dir():
        raise CliError(f"--dataset-dir: {dataset_dir} is not a directory")
    try:
        check_current_is_a_link(bundle_root)
    except BundleError as exc:  # listed without a `*` and without a word before
        typer.echo(f"warning: {exc}; no version is current", err=True)
    current = current_version(bundle_root)
    rows = [_version_row(bundle_root / v, v == current) for v in list_versions(bundle_root)]
    if dataset_dir is not None:
        dataset = SequenceDataset.load(dataset_dir)
        for row in rows:
            if "error" not in row:
                try:  # one damaged version is marked, as an unreadable manifest is
                    bundle = load_bundle(bundle_root / row["version"])
                except BundleError as exc:
                    row["error"] = str(exc)
                    continue
                row[SAME_USERS] = evaluate_bundle(bundle, dataset, "test")["recall@50"]
    if as_json:
        echo_json({"bundle_root": str(bundle_root), "current": current, "versions": rows})
        return
    if not rows:
        typer.echo(f"no versions in {bundle_root}")
    for row in rows:
        typer.echo(_version_line(row))
    if current is not None and not any(row["current"] for row in rows):
        # What an operator runs this to find: the service has nothing to load from `current`.
        advice = " (roll back to one of the versions above)" if rows else ""
        typer.echo(f"current -> {current}: missing{advice}")


def _version_row(path: Any, is_current: bool) -> dict[str, Any]:
    try:
        manifest = read_manifest(path)
    except BundleError as exc:
        return {"version": path.name, "current": is_current, "error": str(exc)}
    # Fields of the wrong type (a hand-edited manifest) show as unknown, not as a traceback.
    test = _section(_section(manifest, "metrics"), "test")
    items = manifest.get("num_items")
    return {
        "version": path.name,
        "current": is_current,
        "created_at": manifest.get("created_at"),
        "items": items - 1 if type(items) is int else "n/a",
        "test_recall@50": test.get("recall@50"),
        "kind": _section(manifest, "nightly").get("kind", "manual"),
    }


def _section(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    value = manifest.get(key)
    return value if isinstance(value, dict) else {}


def _version_line(row: dict[str, Any]) -> str:
    mark = "*" if row["current"] else " "
    if "error" in row:
        return f"{mark} {row['version']}  unreadable: {row['error']}"
    recall = row["test_recall@50"]
    recall_text = f"{recall:.4f}" if isinstance(recall, float) else "n/a"
    same = f"  on the same users {row[SAME_USERS]:.4f}" if SAME_USERS in row else ""
    return (
        f"{mark} {row['version']}  created {row['created_at']}  items {row['items']}  "
        f"test recall@50 {recall_text}{same}  ({row['kind']})"
    )


def rollback(
    version: Annotated[str, typer.Argument(help="Version to make current (see `versions`).")],
    bundle_root: BundleRootOpt,
) -> None:
    """Point `current` at an earlier (or any existing) version, once its files check out; the
    service hot-reloads it.

    The next nightly run compares its model against this version, so it may publish again;
    stop the scheduler first to pin a version.
    """
    previous = current_version(bundle_root)
    version = version.rstrip("/")  # shell completion adds one
    if version in list_versions(bundle_root):
        try:  # a version the API would refuse (and a restarted API could not start on)
            load_bundle(bundle_root / version)
        except BundleError as exc:
            stays = f"so `current` stays {previous}"
            raise CliError(f"{version} cannot serve, {stays}: {exc}") from None
    try:
        set_current(bundle_root, version)
    except BundleError as exc:
        raise CliError(f"{exc} (see `remi-train versions --bundle-root {bundle_root}`)") from None
    echo_json({"bundle_root": str(bundle_root), "previous": previous, "current": version})
