"""Versioned retrieval bundles: the contract between training and serving.

A bundle root holds immutable version directories and a `current` symlink:

    <root>/
      current -> v20261125-101500-3fa2c1
      v20261125-101500-3fa2c1/
        manifest.json          format, model, data, metrics, and {role: {path, sha256}} for files
        encoder.safetensors    encoder weights (no pickle anywhere in a bundle)
        item_embeddings.npy    (N, d) float32, row r = catalogue row r, row 0 padding
        item_ids.json          external item ids in row order (null for row 0)
        popularity.json        catalogue rows by training-interaction count, most popular first
        index.faiss            inner-product index over rows 1..N-1
        item_categories.npy    optional: (N,) int32 category per row (-1: none, always row 0)
        category_names.json    optional, with it: category id -> name

A version is built in a hidden temporary directory and renamed into place, then `current` is
swapped with an atomic rename, so a reader that resolves `current` once never sees half a bundle.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from remi_core.atomic import fsync_dir, fsync_file, naming, write_json_atomic
from remi_core.index import (
    EXACT_MAX_ITEMS,
    RECALL_TARGET,
    ROW_OFFSET,
    apply_search_params,
    assess,
    build_index,
    choose_factory,
    tune_search_params,
)
from remi_core.models import (
    EncoderConfig,
    MultiInterestEncoder,
    build_encoder,
    cpu_state_dict,
    pad_histories,
)

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
CURRENT = "current"
MANIFEST = "manifest.json"
# Every version `current` was pointed at, one per line, oldest first (publishes and rollbacks):
# what retention and the nightly drift guard count as published. Not a dot file, which prune
# would sweep as a dead writer's leftover.
PUBLISHED = "published.log"
# Locked (flock) while `current` switches and while prune takes a version out.
SWITCH_LOCK = ".switch.lock"
# A version directory or dot file left by a writer is this old before it counts as abandoned.
STALE_AFTER_S = 3600
# Load-time checks of the item table (finite, equal to item_embeddings) go over this many
# elements at a time (16 MB of float32), so their temporaries stay small at any catalogue size.
CHECK_BLOCK_ELEMENTS = 1 << 22
FILES = {
    "encoder": "encoder.safetensors",
    "item_embeddings": "item_embeddings.npy",
    "item_ids": "item_ids.json",
    "popularity": "popularity.json",
    "index": "index.faiss",
}
# Present together or not at all; without them serving uses the producing interest as category.
OPTIONAL_FILES = {
    "item_categories": "item_categories.npy",
    "category_names": "category_names.json",
}


class BundleError(Exception):
    """A bundle is missing, incomplete, corrupt or inconsistent."""


class BundleUnreadable(BundleError):
    """A bundle's files could not be read (permissions, I/O errors, too many open files): no
    evidence that it is damaged, so nothing should be deleted or replaced on its account."""


@dataclass
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    manifest: dict[str, Any]
    encoder: MultiInterestEncoder
    item_embeddings: np.ndarray  # (N, d) float32
    item_ids: list[str | None]  # row -> external id
    popularity: np.ndarray  # (P,) rows, most popular first
    index: faiss.Index
    categories: np.ndarray | None = None  # (N,) int32 category per row, -1: none
    category_names: list[str] | None = None

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.cfg

    def row_of(self) -> dict[str, int]:
        """External id -> catalogue row."""
        return {item: row for row, item in enumerate(self.item_ids) if item is not None}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_version_name(now: dt.datetime | None = None) -> str:
    """Sortable, unique version names: v<UTC time>-<random suffix>."""
    now = now or dt.datetime.now(dt.UTC)
    return f"v{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def write_bundle(
    root: Path,
    *,
    encoder: MultiInterestEncoder,
    item_ids: list[str | None],
    popularity: np.ndarray,
    metadata: dict[str, Any],
    index_factory: str | None = None,
    search_params: str | None = None,
    tune_histories: Sequence[np.ndarray] | None = None,
    recall_target: float = RECALL_TARGET,
    recall_n: int = 50,
    exact_max_items: int = EXACT_MAX_ITEMS,
    version: str | None = None,
    publish: bool = True,
    categories: tuple[np.ndarray, list[str]] | None = None,
) -> Path:
    """Write a complete version under root and (by default) make it current.

    `metadata` goes into the manifest as is (dataset, training settings, metrics, ...).
    Without `index_factory` the index is chosen from the catalogue size (`choose_factory`).
    With `tune_histories` (catalogue rows of real users, oldest first, e.g. validation users),
    the index's recall@recall_n against exact Eq. 7 is measured on them and, unless
    `search_params` is given, its search parameter is tuned to reach `recall_target`; both go
    into the manifest's "index" section. `categories` is (one int32 category id per row, -1 for
    none; the category names), optional. Returns the version directory.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot use {root} as a bundle root: {exc}") from None
    version = version or new_version_name()
    final = root / version
    if final.exists():
        raise BundleError(f"bundle version {version} already exists in {root}")
    if len(item_ids) != encoder.cfg.num_items:
        raise ValueError(f"{len(item_ids)} item ids for {encoder.cfg.num_items} catalogue rows")
    num_items = encoder.cfg.num_items
    problem = (
        _item_ids_problem(item_ids)
        or _nonfinite_problem(encoder)
        or _popularity_problem(np.asarray(popularity), num_items)
    )
    if problem:
        raise ValueError(problem)
    files = dict(FILES)
    if categories is not None:
        category_rows = np.asarray(categories[0], dtype=np.int32)
        problem = _categories_problem(category_rows, categories[1], encoder.cfg.num_items)
        if problem:
            raise ValueError(problem)
        files.update(OPTIONAL_FILES)

    tmp = root / f".tmp-{version}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise BundleError(f"cannot write bundle version {version} in {root}: {exc}") from None
    try:
        state = cpu_state_dict(encoder)
        save_file(state, str(tmp / FILES["encoder"]))
        embeddings = state["item_embedding.weight"].float().numpy()
        np.save(tmp / FILES["item_embeddings"], embeddings, allow_pickle=False)
        (tmp / FILES["item_ids"]).write_text(json.dumps(item_ids))
        (tmp / FILES["popularity"]).write_text(json.dumps([int(r) for r in popularity]))
        chosen = index_factory is None
        index_factory = index_factory or choose_factory(len(item_ids) - ROW_OFFSET, exact_max_items)
        index = build_index(embeddings, index_factory)
        apply_search_params(index, search_params or "")
        recall = None
        interests, exclude = encode_histories(
            encoder, [] if tune_histories is None else tune_histories
        )
        if not len(interests) and search_params is None and not isinstance(index, faiss.IndexFlat):
            raise ValueError(
                f"cannot tune the {index_factory} index: no tuning history has a known item; "
                "give its search parameters (e.g. nprobe=32) instead"
            )
        if len(interests):
            table = torch.from_numpy(embeddings)
            if search_params is None:
                tuning = tune_search_params(
                    index, interests, table, recall_n, recall_target, exclude
                )
                search_params = tuning.search_params
            else:
                tuning = assess(
                    index, search_params, interests, table, recall_n, recall_target, exclude
                )
                if not tuning.reached:  # as tuning warns when no value reaches the target
                    log.warning(
                        "recall@%d %.4f (>= %.4f) on %d users is below the target %.2f at the "
                        "given search parameters %r",
                        recall_n, tuning.recall, tuning.recall_lower, tuning.queries,
                        recall_target, search_params,
                    )  # fmt: skip
            recall = tuning.to_manifest()
        _write_index(index, tmp / FILES["index"])
        if categories is not None:
            np.save(tmp / OPTIONAL_FILES["item_categories"], category_rows, allow_pickle=False)
            (tmp / OPTIONAL_FILES["category_names"]).write_text(json.dumps(list(categories[1])))

        manifest = {
            "format_version": FORMAT_VERSION,
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),  # microseconds: orders versions
            "model": encoder.cfg.to_dict(),
            "num_items": encoder.cfg.num_items,
            "index": {
                "factory": index_factory,
                "search_params": search_params or "",
                "metric": "inner_product",
                "row_offset": ROW_OFFSET,
                # "size" when chosen from the catalogue size, "given" when named by the caller
                "chosen_by": "size" if chosen else "given",
                "exact_max_items": exact_max_items,
                # recall@n of the served list against exact Eq. 7 on tune_histories, or null
                "recall": recall,
            },
            **metadata,
            "files": {
                role: {"path": name, "sha256": sha256_of(tmp / name)}
                for role, name in files.items()
            },
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        # Readable by a serving process running as another user (safetensors writes 0600), and
        # on disk before `current` can name the version: after a power loss a published version
        # must not hold empty files.
        for file in tmp.iterdir():
            file.chmod(0o644)
            fsync_file(file)
        tmp.chmod(0o755)
        fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError | SafetensorError):  # safetensors' I/O errors are its own type
            # np.save on a full disk says only "6000 requested and 5088 written".
            raise BundleError(f"cannot write bundle version {version} in {root}: {exc}") from exc
        raise
    if publish:
        publish_or_discard(root, version, lambda: None)
    return final


# Users whose recall is measured when tuning an index, half choosing the search parameter and
# half confirming it (`tune_search_params`): enough for a stable mean at 0.95 (its standard error
# was 0.0035 on 2,000 Sports users), few enough to keep an export quick.
TUNE_USERS = 4000


def encode_histories(
    encoder: MultiInterestEncoder, histories: Sequence[np.ndarray], max_users: int = TUNE_USERS
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Interests (U, K, d) of up to max_users non-empty histories (a seeded sample) and each
    user's rows to exclude, as serving encodes them (last seq_len items, history excluded)."""
    rows = [np.asarray(h, dtype=np.int64) for h in histories]
    rows = [h[h > 0] for h in rows]
    rows = [h for h in rows if len(h)]
    if len(rows) > max_users:
        picked = np.random.default_rng(0).choice(len(rows), max_users, replace=False)
        rows = [rows[i] for i in np.sort(picked)]
    seq_len = encoder.cfg.seq_len
    device = next(encoder.parameters()).device
    out = []
    was_training = encoder.training
    encoder.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), 256):
            items, mask = pad_histories([h[-seq_len:] for h in rows[start : start + 256]], seq_len)
            interests, _ = encoder(items.to(device), mask.to(device))
            out.append(interests.float().cpu().numpy())
    encoder.train(was_training)
    dim = encoder.cfg.dim
    interests = np.concatenate(out) if out else np.zeros((0, encoder.num_interests, dim))
    return interests.astype(np.float32), rows


@contextlib.contextmanager
def _switching(root: Path) -> Iterator[None]:
    """Hold the root's lock: `set_current` (its check, log entry and switch) and prune's
    taking out of a version exclude each other, across processes, so a rollback can neither
    land on a version being deleted nor have a deletion start between its check and its
    switch, and publishers never write the log at once."""
    try:
        fd = os.open(root / SWITCH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BundleError(f"cannot lock {root / SWITCH_LOCK}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class CurrentMoved(BundleError):
    """`current` no longer names the version a switch was decided against."""


_ANY = object()  # set_current's `expected` when any current will do


def set_current(root: Path, version: str, expected: str | None | object = _ANY) -> None:
    """Atomically point `current` at an existing version (publish or roll back). With
    `expected` (a version, or None for no current), only if `current` still names it, checked
    under the root's lock: CurrentMoved otherwise (an operator's rollback during a nightly run
    was overwritten by a model compared against the version rolled away from)."""
    root = Path(root)
    version = version.rstrip("/")  # shell completion adds one
    with _switching(root):
        if expected is not _ANY and (now := current_version(root)) != expected:
            raise CurrentMoved(
                f"{root / CURRENT} was switched to {now} (from {expected}) meanwhile; "
                f"{version} was not made current"
            )
        _switch(root, version)


def _switch(root: Path, version: str) -> None:
    if version not in list_versions(root):
        raise BundleError(f"no bundle version {version!r} in {root}")
    check_current_is_a_link(root)
    current = root / CURRENT
    # Logged before the switch: a log write that fails (a full disk) then leaves `current` as
    # it was, while after it a served version missing from the log would count as never
    # published, and retention would delete it (the rollback target) an hour later. A switch
    # that fails takes its entry back out of the log.
    entry = _record_published(root, version)
    link = root / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(version, link)  # relative, so the root can be mounted anywhere
        os.replace(link, current)
    except OSError as exc:
        link.unlink(missing_ok=True)
        _unrecord(root, entry)
        raise BundleError(f"cannot point {current} at {version}: {exc}") from None
    fsync_dir(root)


def _write_index(index: faiss.Index, path: Path) -> None:
    """faiss.write_index through a Python file, whose failed writes raise: faiss's own file
    writer only prints an error at its last block's close (a disk full there, NFS, quotas),
    and the cut-short index was published with the checksum of what was written. Streamed, not
    serialised first (that held two copies of a large index in memory)."""
    try:
        with naming(path), path.open("wb") as out:

            def write(chunk: bytes) -> int:
                out.write(chunk)  # buffered: writes all of it or raises
                return len(chunk)

            faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    except RuntimeError as exc:  # an index faiss cannot write
        raise OSError(f"cannot write {path.name}: {exc}") from None


def _record_published(root: Path, version: str) -> tuple[int, int, bool]:
    """Append `version` to the log; returns where its entry starts and ends, and whether this
    created the log. A write that fails is cut back off (a log it created goes again: left
    empty, it would say nothing was ever published, and retention would delete a root from
    before the log), and an entry never continues a line a crash left unfinished."""
    log_path = root / PUBLISHED
    # Under the root's lock: no other switch creates it. A log without entries is no log
    # (`published_log`): started afresh like a missing one.
    try:
        published_log(root)
        created = False
    except FileNotFoundError:
        created = True
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot record {version} in {log_path}: {exc}") from None
    # A root from before the log (it has `current`; a new root has not, and its versions
    # written with --no-publish were never published): its versions so far were all
    # published, oldest first, and the one `current` names (perhaps rolled back to, and older)
    # last, as the latest publish.
    serving = current_version(root)
    pre_log = created and serving is not None
    earlier = [v for v in list_versions(root) if v != version] if pre_log else []
    if serving in earlier:
        earlier = [v for v in earlier if v != serving] + [serving]
    entry = "".join(f"{v}\n" for v in [*earlier, version]).encode()
    fd = -1
    try:
        # Unbuffered: a buffered file retried its failed write at truncate() and failed again,
        # so a write that stopped partway (a full disk) left its bytes as a logged version.
        fd = os.open(log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        start = os.lseek(fd, 0, os.SEEK_END)
        if start and os.pread(fd, 1, start - 1) != b"\n":
            entry = b"\n" + entry
        try:
            written = 0
            while written < len(entry):
                written += os.write(fd, entry[written:])
            os.fsync(fd)
        except OSError:
            if created:
                log_path.unlink()
            else:
                os.ftruncate(fd, start)  # shrinking needs no free block
            raise
    except OSError as exc:
        raise BundleError(f"cannot record {version} in {log_path}: {exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    return start, start + len(entry), created


def _unrecord(root: Path, entry: tuple[int, int, bool]) -> None:
    """Take a logged entry back out (the log with it, if the entry created it), unless someone
    appended after it (a writer that does not take the root's lock: an older version of this
    code)."""
    log_path = root / PUBLISHED
    start, end, created = entry
    with contextlib.suppress(OSError):
        if log_path.stat().st_size == end:
            if created:
                log_path.unlink()
            else:
                os.truncate(log_path, start)


def published_log(root: Path) -> list[str]:
    """Every version `current` was pointed at, oldest first, repeats included (published.log);
    FileNotFoundError for a root from before the log, or a log without entries (left by a crash
    between its creation and its first write: read as empty, every version before it counted
    as never published, and retention deleted them)."""
    path = Path(root) / PUBLISHED
    named = path.read_text().split()
    if not named:
        raise FileNotFoundError(errno.ENOENT, "no entries in the publish log", str(path))
    return named


def published_versions(root: Path) -> list[str]:
    """The versions on disk that `current` has named, least recently named first (a rollback
    makes a version recent again). A root from before the log (with `current`): every version,
    oldest first; a root nothing was published in: none."""
    root = Path(root)
    versions = list_versions(root)
    current = current_version(root)
    try:
        named = published_log(root)
    except FileNotFoundError:
        return versions if current is not None else []
    last = {version: i for i, version in enumerate(named)}
    if current is not None:
        last[current] = len(named)  # what serves now, even if a writer without the log set it
    return sorted((v for v in versions if v in last), key=last.__getitem__)


def publish_or_discard(
    root: Path, version: str, check: Callable[[], None], expected: str | None | object = _ANY
) -> None:
    """Run `check` (e.g. that a lock is still held), then make `version` current (only if
    `current` still names `expected`, when given: see `set_current`); if either fails before
    `current` names the version, delete it, so an unpublished version never counts toward
    retention. After the switch (set_current's last step, syncing the root, can still fail)
    the version is published and stays."""
    try:
        check()
        set_current(root, version, expected)
    except BaseException:
        if current_version(root) != version:
            shutil.rmtree(Path(root) / version, ignore_errors=True)
        raise


def current_version(root: Path) -> str | None:
    link = Path(root) / CURRENT
    return Path(os.readlink(link)).name if link.is_symlink() else None


def check_current_is_a_link(root: Path) -> None:
    """BundleError when `current` is there but no symlink: what `rsync -L` or `cp -rL` leave,
    the link's target copied in its place, which no switch can replace."""
    current = Path(root) / CURRENT
    if current.exists() and not current.is_symlink():
        raise BundleError(f"{current} is not a symlink (a copied version?): move it away first")


def resolve_current(root: Path) -> Path:
    """The version directory `current` points at, resolved once."""
    root = Path(root)
    check_current_is_a_link(root)
    version = current_version(root)
    if version is None:
        raise BundleError(f"no published bundle: {root / CURRENT} does not exist")
    path = root / version
    if not path.is_dir():
        raise BundleError(f"{root / CURRENT} points at missing version {version!r}")
    return path


def list_versions(root: Path) -> list[str]:
    """Complete versions under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    versions = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.name != CURRENT
    ]
    versions = [p for p in versions if _has_manifest(p)]
    return [p.name for p in sorted(versions, key=lambda p: (created_at(p), p.name))]


def _has_manifest(path: Path) -> bool:
    """Whether a directory holds a manifest (a complete version); one that cannot be looked
    into (permissions) counts, so it is listed, and fails when read, rather than stopping
    every listing with its OSError."""
    try:
        return (path / MANIFEST).is_file()
    except OSError:
        return True


def created_at(path: Path) -> str:
    """A version's creation time as its manifest says (ISO 8601, so strings order as times);
    "" when the manifest is missing or unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return ""
    return str(manifest.get("created_at", "")) if isinstance(manifest, dict) else ""


def rolled_back_from(named: Sequence[str], when: Mapping[str, str]) -> set[str]:
    """Versions whose last publish in `named` (published_log) was followed by one of an older
    version (a rollback). Older by `when` (version -> `created_at`) or, where either time is
    unreadable (a damaged manifest, perhaps of the version rolled back to), by the order of
    their first publishes in the log."""
    first: dict[str, int] = {}
    for i, version in enumerate(named):
        first.setdefault(version, i)
    last = {version: i for i, version in enumerate(named)}

    def older(a: str, b: str) -> bool:
        if when.get(a) and when.get(b):
            return when[a] < when[b]
        return first[a] < first[b]

    return {v for v, i in last.items() if i + 1 < len(named) and older(named[i + 1], v)}


def prune(root: Path, keep: int, unusable: Collection[str] = ()) -> list[str]:
    """Delete all but the `keep` most recently published versions (`published_versions`: a
    version rolled back to counts as just published), never the current one, and versions
    never published once they are stale (a writer killed between writing and publishing);
    returns what went. Versions known `unusable` (damaged files) take no place among the
    `keep`: a damaged one rolled back to, then replaced, kept its place and an intact older
    one went, leaving no version to roll back to."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    root = Path(root)
    published = [v for v in published_versions(root) if v not in unusable]
    stale = time.time() - STALE_AFTER_S
    survivors = set(published[-keep:]) | {current_version(root)}
    removed = [
        v
        for v in list_versions(root)
        if v not in survivors
        and (v in published or v in unusable or (root / v).stat().st_mtime < stale)
    ]
    for version in list(removed):
        if not _take_out(root, version):
            removed.remove(version)
    # Half-built versions and link swaps of writers that died; never a live writer's (fresh).
    for leftover in Path(root).glob(".*"):
        if leftover.name != SWITCH_LOCK and leftover.lstat().st_mtime < stale:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return removed


def _take_out(root: Path, version: str) -> bool:
    """Delete a version unless `current` names it: under the root's lock it is renamed out of
    the versions (a rollback to it then fails cleanly), and deleted after (seconds for a large
    version, which no rollback waits for)."""
    going = root / f".deleting-{version}-{uuid.uuid4().hex[:8]}"
    with _switching(root):
        if current_version(root) == version:
            return False
        os.rename(root / version, going)
    shutil.rmtree(going)
    return True


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{manifest_path} is missing") from None
    except OSError as exc:  # permissions, I/O: this version cannot be used, not now
        raise BundleUnreadable(f"cannot read {manifest_path}: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r} is not "
            f"supported (expected {FORMAT_VERSION})"
        )
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists against its sha256."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"{path / MANIFEST}: 'files' must be an object, not {files!r}")
    missing_roles = set(FILES) - set(files)
    if missing_roles:
        raise BundleError(f"{path / MANIFEST} lists no file for {sorted(missing_roles)}")
    for role, entry in files.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("sha256"), str)
        ):
            raise BundleError(
                f"{path / MANIFEST}: files.{role} must be an object with string 'path' and "
                f"'sha256', not {entry!r}"
            )
        file = path / entry["path"]
        if not file.is_file():
            raise BundleError(f"bundle file {file} ({role}) is missing")
        actual = sha256_of(file)
        if actual != entry["sha256"]:
            raise BundleError(
                f"checksum mismatch for {file} ({role}): manifest says {entry['sha256'][:12]}..., "
                f"file has {actual[:12]}..."
            )


def load_bundle(path: Path, device: str | torch.device = "cpu", verify: bool = True) -> Bundle:
    """Load a version directory (or a root, meaning its current version) and check it."""
    path = Path(path)
    try:
        if (path / CURRENT).is_symlink():
            path = resolve_current(path)
        path = path.resolve()
    except OSError as exc:  # a version directory this process may not look into
        raise BundleUnreadable(f"cannot read bundle {path}: {exc}") from None
    manifest = read_manifest(path)
    if manifest.get("version") != path.name:
        # Served, reported and rolled back by this name; the manifest is not checksummed.
        raise BundleError(
            f"{path / MANIFEST}: version {manifest.get('version')!r} is not its directory's "
            f"name {path.name!r}"
        )
    if verify:
        try:
            verify_files(path, manifest)
        except OSError as exc:  # verify_files raises it apart for `publish._damaged`
            raise BundleUnreadable(f"cannot read bundle {path}: {exc}") from None
    try:
        files = {role: path / entry["path"] for role, entry in manifest["files"].items()}
        cfg = EncoderConfig.from_dict(manifest["model"])
        # Built without storage and given the weights file's tensors (assign): no random
        # init of an (N, d) table only to overwrite it, and no copy of the file's (a map).
        with torch.device("meta"):
            encoder = build_encoder(cfg)
        encoder.load_state_dict(load_file(str(files["encoder"])), assign=True)
        # Read into memory, not mapped: a map's pages may be dropped under memory pressure and
        # read back from disk mid-request, and a file truncated in place would crash the worker.
        embeddings = np.load(files["item_embeddings"], allow_pickle=False)
        item_ids = json.loads(files["item_ids"].read_text())
        # No dtype here: floats (or ids) cast to int64 would be other rows, silently.
        popularity = np.asarray(json.loads(files["popularity"].read_text()))
        index = faiss.read_index(str(files["index"]))
        apply_search_params(index, manifest["index"].get("search_params", ""))
        categories, category_names = _read_categories(files)
    # MemoryError: an array header declaring a huge shape (unverified files), or a real one
    except (
        KeyError,
        TypeError,
        AttributeError,
        ValueError,
        RuntimeError,
        OSError,
        MemoryError,
    ) as exc:
        raise BundleError(f"cannot load bundle {path}: {type(exc).__name__}: {exc}") from None
    _check_shapes(path, cfg, encoder, embeddings, item_ids, popularity, index)
    if categories is not None:
        problem = _categories_problem(categories, category_names, cfg.num_items)
        if problem:
            raise BundleError(f"{path}: {problem}")
    # The two tables are equal (checked above): one array serves as both, and the weights
    # file's map is let go (its other tensors are small, copied), so a process holds the table
    # once, not twice (2.56 GB each at 10M items and d=64).
    table = encoder.item_table()
    for tensor in itertools.chain(encoder.parameters(), encoder.buffers()):
        if tensor is not table:
            tensor.data = tensor.data.clone()
    table.data = torch.from_numpy(embeddings)
    encoder.to(device).eval()
    return Bundle(
        path, manifest, encoder, embeddings, item_ids, popularity.astype(np.int64), index,
        categories, category_names,
    )  # fmt: skip


def _read_categories(files: dict[str, Path]) -> tuple[np.ndarray | None, list[str] | None]:
    present = [role for role in OPTIONAL_FILES if role in files]
    if not present:
        return None, None
    if len(present) != len(OPTIONAL_FILES):
        raise ValueError(f"the manifest lists {present} but not all of {sorted(OPTIONAL_FILES)}")
    categories = np.load(files["item_categories"], allow_pickle=False)
    return categories, json.loads(files["category_names"].read_text())


def _categories_problem(categories: np.ndarray, names: Any, num_items: int) -> str | None:
    """One int32 id per row in -1..len(names)-1, -1 for padding row 0; names distinct strings."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "category names must be a list of strings"
    if len(set(names)) != len(names):
        return "category names must be distinct"
    if categories.shape != (num_items,) or categories.dtype != np.int32:
        shape = f"{categories.dtype}{categories.shape}"
        return f"item categories are {shape}, expected int32({num_items},)"
    if categories[0] != -1:
        return "item_categories[0] must be -1 (padding row)"
    if categories.min() < -1 or categories.max() >= len(names):
        return f"item categories must lie in -1..{len(names) - 1}"
    return None


def _check_shapes(path, cfg, encoder, embeddings, item_ids, popularity, index) -> None:
    expected = (cfg.num_items, cfg.dim)
    if embeddings.shape != expected or embeddings.dtype != np.float32:
        raise BundleError(
            f"{path}: item_embeddings is {embeddings.dtype}{embeddings.shape}, expected "
            f"float32{expected}"
        )
    if len(item_ids) != cfg.num_items:
        raise BundleError(f"{path}: {len(item_ids)} item ids for {cfg.num_items} rows")
    problem = _item_ids_problem(item_ids)
    if problem:
        raise BundleError(f"{path}: {problem}")
    if index.d != cfg.dim or index.ntotal != cfg.num_items - ROW_OFFSET:
        raise BundleError(
            f"{path}: index holds {index.ntotal} vectors of size {index.d}, expected "
            f"{cfg.num_items - ROW_OFFSET} of size {cfg.dim}"
        )
    problem = _popularity_problem(popularity, cfg.num_items)
    if problem:
        raise BundleError(f"{path}: {problem}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"{path}: the index does not rank by inner product (Eq. 7)")
    table = encoder.item_table().detach().cpu().numpy()
    # In blocks of rows: a whole-table comparison allocates a mask of N x d (640 MB at 10M).
    block = CHECK_BLOCK_ELEMENTS // max(cfg.dim, 1)
    if not all(
        np.array_equal(table[r : r + block], embeddings[r : r + block])
        for r in range(0, len(table), block)
    ):
        raise BundleError(f"{path}: item_embeddings differ from the encoder's item table")
    problem = _nonfinite_problem(encoder)
    if problem:
        raise BundleError(f"{path}: {problem}")


def _nonfinite_problem(encoder: MultiInterestEncoder) -> str | None:
    """A NaN or infinite weight (a diverged training run) makes every score NaN: no ranking,
    and the screened search's bound meaningless. Such a model is refused, not served."""
    bad = [name for name, t in encoder.state_dict().items() if not _all_finite(t)]
    if bad:
        return f"the encoder has NaN or infinite weights in {', '.join(sorted(bad))}"
    return None


def _all_finite(tensor: torch.Tensor) -> bool:
    """In blocks: isfinite() over a whole 10M-item table allocates 3.7 GB of temporaries."""
    flat, block = tensor.reshape(-1), CHECK_BLOCK_ELEMENTS
    return all(bool(flat[i : i + block].isfinite().all()) for i in range(0, flat.numel(), block))


def _popularity_problem(popularity: np.ndarray, num_items: int) -> str | None:
    """Distinct catalogue rows, most popular first: the list a user with no known item gets."""
    if popularity.ndim != 1 or (popularity.size and popularity.dtype.kind not in "iu"):
        return "popularity must be a list of catalogue rows (whole numbers)"
    if len(popularity) and (popularity.min() < 1 or popularity.max() >= num_items):
        return f"popularity lists rows outside 1..{num_items - 1}"
    if len(np.unique(popularity)) != len(popularity):
        return "popularity lists a row twice"
    return None


def _item_ids_problem(item_ids: list) -> str | None:
    """Row 0 is padding (None); every other row a distinct, non-empty string id."""
    if not item_ids or item_ids[0] is not None:
        return "item_ids[0] must be null (padding row)"
    real = item_ids[1:]
    if not all(isinstance(i, str) and i for i in real):
        return "item ids of rows 1.. must be non-empty strings"
    if len(set(real)) != len(real):
        return "item ids must be unique"
    return None
