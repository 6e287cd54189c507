"""The bundle format (remi_core/bundle.py): checksums, publishing, pruning and rollback."""

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from remi_core import atomic, bundle
from remi_core.bundle import (
    BundleError,
    BundleUnreadable,
    current_version,
    list_versions,
    load_bundle,
    prune,
    publish_or_discard,
    published_log,
    published_versions,
    read_manifest,
    rolled_back_from,
    set_current,
    write_bundle,
)
from remi_core.models import EncoderConfig, build_encoder
from tests.helpers import TINY, tiny_item_ids, write_tiny_bundle


@pytest.mark.parametrize("role", ["encoder", "item_embeddings", "index", "item_ids"])
def test_a_corrupted_file_is_rejected_by_its_checksum(tmp_path, role):
    path = write_tiny_bundle(tmp_path / "bundles")
    manifest = json.loads((path / "manifest.json").read_text())
    file = path / manifest["files"][role]["path"]
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"checksum mismatch for .*{file.name}"):
        load_bundle(path)


def test_publishing_pruning_and_rollback(tmp_path):
    root = tmp_path / "bundles"
    first = write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2")
    write_tiny_bundle(root, version="v3", publish=False)
    assert list_versions(root) == ["v1", "v2", "v3"] and current_version(root) == "v2"
    set_current(root, first.name)  # roll back
    assert load_bundle(root).version == "v1"
    assert prune(root, keep=1) == ["v2"]  # newest kept, and the current one too
    assert list_versions(root) == ["v1", "v3"]
    with pytest.raises(BundleError, match="no bundle version 'v9'"):
        set_current(root, "v9")
    for bad in ("current", "../bundles/v1", ".tmp-v1"):
        with pytest.raises(BundleError, match="no bundle version"):
            set_current(root, bad)
    set_current(root, "v3/")  # as shell completion types it
    assert current_version(root) == "v3" and prune(root, keep=1) == ["v1"]
    leftovers = [p for p in root.iterdir() if p.name.startswith(".") and p.name != ".switch.lock"]
    assert not leftovers, "no temporary leftovers"


def test_retention_counts_publishes_and_keeps_what_was_rolled_back_to(tmp_path):
    root = tmp_path / "bundles"
    for version in ("v1", "v2", "v3", "v4"):
        write_tiny_bundle(root, version=version)
    set_current(root, "v2")  # roll back past two bad nights
    write_tiny_bundle(root, version="v5")  # the next night publishes
    # Most recently named: v5, v2 (rolled back to), v4. The rolled-back version stays.
    assert published_versions(root) == ["v1", "v3", "v4", "v2", "v5"]
    assert prune(root, keep=3) == ["v1", "v3"]


def test_a_damaged_version_takes_no_place_among_those_kept(tmp_path):
    # Rolled back to v1, v1 found damaged and replaced by v3: v1 kept its place and v2, the only
    # intact version to roll back to, went.
    root = tmp_path / "bundles"
    for version in ("v1", "v2"):
        write_tiny_bundle(root, version=version)
    set_current(root, "v1")
    write_tiny_bundle(root, version="v3")
    assert published_versions(root) == ["v2", "v1", "v3"]
    assert prune(root, keep=2, unusable=("v1",)) == ["v1"]
    assert list_versions(root) == ["v2", "v3"]
    # A damaged current stays (it is current), and keeps no intact version from its place.
    assert prune(root, keep=1, unusable=("v3",)) == [] and list_versions(root) == ["v2", "v3"]


def test_a_version_never_published_counts_for_nothing_and_goes_when_stale(tmp_path):
    # A nightly run killed between writing its version and publishing it left that version
    # behind, counted toward retention: the last good versions were pruned in its place.
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2")
    orphan = write_tiny_bundle(root, version="v3", publish=False)
    assert published_versions(root) == ["v1", "v2"]
    assert prune(root, keep=2) == []  # fresh: maybe a writer about to publish it
    old = time.time() - bundle.STALE_AFTER_S - 60
    os.utime(orphan, (old, old))
    assert prune(root, keep=2) == ["v3"]
    assert list_versions(root) == ["v1", "v2"]


def test_versions_staged_in_a_new_root_are_not_published_by_the_first_publish(tmp_path):
    # A root with no log and no `current` is new, not from before the log: the versions staged
    # there (--no-publish, or a first run killed before its switch) were never published, and
    # counted as published they were kept, became drift baselines and could be served.
    root = tmp_path / "bundles"
    staged = write_tiny_bundle(root, version="v1", publish=False)
    write_tiny_bundle(root, version="v2", publish=False)
    assert published_versions(root) == []
    set_current(root, "v2")
    assert published_log(root) == ["v2"] and published_versions(root) == ["v2"]
    old = time.time() - bundle.STALE_AFTER_S - 60
    os.utime(staged, (old, old))
    assert prune(root, keep=5) == ["v1"]


def test_a_root_from_before_the_publish_log_keeps_its_versions(tmp_path):
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2")
    (root / bundle.PUBLISHED).unlink()  # as written by a version of this code without the log
    assert published_versions(root) == ["v1", "v2"]
    write_tiny_bundle(root, version="v3")  # the first publish with the log counts the others
    assert published_versions(root) == ["v1", "v2", "v3"]
    assert prune(root, keep=3) == []
    # Rolled back to the oldest before the log existed: it was the latest publish, not the
    # oldest, and the next prune deleted the version that had served until then.
    (root / bundle.PUBLISHED).unlink()
    set_current(root, "v1")
    (root / bundle.PUBLISHED).unlink()
    write_tiny_bundle(root, version="v4")
    assert published_versions(root) == ["v2", "v3", "v1", "v4"]
    assert prune(root, keep=2) == ["v2", "v3"]


def test_index_factory_is_recorded(tmp_path):
    path = write_tiny_bundle(tmp_path / "b", index_factory="HNSW16", search_params="efSearch=40")
    bundle = load_bundle(path)
    assert bundle.manifest["index"]["factory"] == "HNSW16"
    assert bundle.manifest["index"]["search_params"] == "efSearch=40"
    assert bundle.index.ntotal == len(bundle.item_ids) - 1


@pytest.mark.parametrize(
    ("files", "verify"),
    [
        (["encoder.safetensors"], True),  # not an object
        (["encoder.safetensors"], False),
        ({"index": "index.faiss"}, True),  # an entry that is not an object
        ({"index": "index.faiss"}, False),
        ({"index": {"path": "index.faiss"}}, True),  # no sha256 to check against
        ({"index": {"sha256": "0" * 64}}, True),  # no path
        ({"index": {"sha256": "0" * 64}}, False),
    ],
)
def test_a_malformed_files_section_is_a_bundle_error(tmp_path, files, verify):
    path = write_tiny_bundle(tmp_path / "bundles")
    manifest = json.loads((path / "manifest.json").read_text())
    if isinstance(files, dict):
        files = {**manifest["files"], **files}
    (path / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    with pytest.raises(BundleError, match="manifest.json|cannot load bundle"):
        load_bundle(path, verify=verify)


def test_every_file_of_a_version_is_on_disk_before_it_can_be_published(tmp_path, monkeypatch):
    """A directory's fsync covers its entries, not the files' contents: each file is synced
    itself, or a power loss could leave `current` naming a version of empty files."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    path = write_tiny_bundle(tmp_path / "bundles")
    assert {f.name for f in path.iterdir()} <= set(synced)


def test_publish_or_discard(tmp_path, monkeypatch):
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2", publish=False)

    def lock_lost() -> None:
        raise RuntimeError("lock lost")

    with pytest.raises(RuntimeError, match="lock lost"):  # before the switch: v2 is removed
        publish_or_discard(root, "v2", lock_lost)
    assert list_versions(root) == ["v1"] and current_version(root) == "v1"

    # set_current's last step, syncing the root, fails after `current` already names v3: v3 is
    # published and must stay.
    write_tiny_bundle(root, version="v3", publish=False)
    real_fsync_dir = bundle.fsync_dir

    def failing_fsync_dir(path: Path) -> None:
        if Path(path) == root:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(bundle, "fsync_dir", failing_fsync_dir)
    with pytest.raises(OSError, match="Input/output error"):
        publish_or_discard(root, "v3", lambda: None)
    monkeypatch.undo()
    assert current_version(root) == "v3" and load_bundle(root).version == "v3"


def test_a_publish_whose_log_cannot_be_written_leaves_current_as_it_was(tmp_path):
    # The log of published versions is what retention keeps: a version `current` named but the
    # log lacked was pruned as never published an hour later, though it had served.
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2", publish=False)
    log = root / "published.log"
    log.rename(root / "published.bak")
    log.mkdir()  # a real failed write: opening it for appending is an error
    with pytest.raises(BundleError, match="cannot record v2 in .*published.log"):
        publish_or_discard(root, "v2", lambda: None)
    assert current_version(root) == "v1" and list_versions(root) == ["v1"]


LOG_FILLS_UP = """
import resource, signal, sys
from pathlib import Path
from remi_core.bundle import BundleError, set_current
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
root = Path(sys.argv[1])
log = root / "published.log"
size = (log.stat().st_size if log.exists() else 0) + 2  # room for two of the entry's bytes
resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
try:
    set_current(root, "v2")
except BundleError as exc:
    print(exc)
"""


def switch_to_v2_with_a_full_disk(root: Path) -> str:
    """What set_current(root, "v2") says when the log can grow by two bytes only."""
    out = subprocess.run([sys.executable, "-c", LOG_FILLS_UP, str(root)], capture_output=True,
                         text=True, cwd=Path(__file__).parents[2], timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def fail_replacing_current(patch: pytest.MonkeyPatch) -> None:
    """Make the link swap of a switch (os.replace onto `current`) fail as on a full disk."""
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "current":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    patch.setattr(bundle.os, "replace", failing_replace)


def test_a_log_entry_the_disk_cuts_short_is_taken_back(tmp_path):
    # The log was written buffered: its failed flush was retried by truncate(), which failed
    # too, so the bytes that made it stayed ("v2" of its entry's three): a version never
    # served counted as the latest published (prune then deleted the one that had served).
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2", publish=False)
    before = (root / "published.log").read_bytes()
    said = switch_to_v2_with_a_full_disk(root)
    assert "cannot record v2 in" in said and "File too large" in said
    assert (root / "published.log").read_bytes() == before
    assert current_version(root) == "v1" and published_log(root) == ["v1"]


def test_a_failed_first_log_write_leaves_a_root_from_before_the_log_as_it_was(
    tmp_path, monkeypatch
):
    # The first switch creates the log with every earlier version in it; cut short, it was
    # left empty, which says nothing was ever published: the next prune deleted every version
    # but the new one (the one serving until then too).
    root = tmp_path / "bundles"
    for version in ("v1", "v2"):
        write_tiny_bundle(root, version=version)
    write_tiny_bundle(root, version="v3", publish=False)
    (root / bundle.PUBLISHED).unlink()  # as written by a version of this code without the log
    said = switch_to_v2_with_a_full_disk(root)
    assert "cannot record v2 in" in said and "File too large" in said
    assert not (root / bundle.PUBLISHED).exists()
    with monkeypatch.context() as patch:  # logged, then the link could not be swapped
        fail_replacing_current(patch)
        with pytest.raises(BundleError, match="cannot point .*current at v3"):
            set_current(root, "v3")
    assert not (root / bundle.PUBLISHED).exists()
    assert current_version(root) == "v2" and published_versions(root) == ["v1", "v2", "v3"]
    old = time.time() - bundle.STALE_AFTER_S - 60
    for version in ("v1", "v2", "v3"):
        os.utime(root / version, (old, old))
    write_tiny_bundle(root, version="v4")
    assert prune(root, keep=3) == ["v1"]
    assert published_versions(root) == ["v3", "v2", "v4"]  # v2 served last before v4


def test_a_publish_log_without_entries_is_no_log(tmp_path):
    # A crash between the log's creation and its first write left it empty: read as "nothing
    # published", the next publish logged itself alone and retention deleted the others.
    root = tmp_path / "bundles"
    for version in ("v1", "v2"):
        write_tiny_bundle(root, version=version)
    (root / bundle.PUBLISHED).write_text("")
    assert published_versions(root) == ["v1", "v2"]
    write_tiny_bundle(root, version="v3")
    assert published_log(root) == ["v1", "v2", "v3"]
    assert prune(root, keep=3) == []


def test_a_rollback_is_told_by_the_log_where_a_manifest_tells_no_age():
    when = {"a": "2026-01-01", "b": "2026-01-02"}
    assert rolled_back_from(["a", "b", "a"], when) == {"b"}
    # a's manifest damaged (the version rolled back to, say): its first publish came first
    assert rolled_back_from(["a", "b", "a"], {"b": when["b"]}) == {"b"}
    assert rolled_back_from(["a", "b"], {"b": when["b"]}) == set()  # published in order
    assert rolled_back_from(["a", "b", "b"], {}) == set()


def test_a_version_that_cannot_be_looked_into_is_listed_and_unreadable(tmp_path, monkeypatch):
    # A version directory without search permission (PermissionError from is_file, which
    # root, running the tests in CI, never gets): it stopped every listing and load.
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2")
    is_file, is_symlink = Path.is_file, Path.is_symlink

    def denied(real):
        def check(path: Path) -> bool:
            if path.parent.name == "v1":
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path)

        return check

    monkeypatch.setattr(Path, "is_file", denied(is_file))
    monkeypatch.setattr(Path, "is_symlink", denied(is_symlink))
    assert list_versions(root) == ["v1", "v2"]  # v1 without a readable age: first
    with pytest.raises(BundleUnreadable, match="cannot read bundle .*v1.*Permission denied"):
        load_bundle(root / "v1")


def test_a_switch_that_fails_takes_its_log_entry_back(tmp_path, monkeypatch):
    # Logged, then the link could not be swapped: the log named a version that never served,
    # and retention and the start-up fallback counted it as published.
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    (root / "published.log").write_bytes(b"v1\nv0-half-writ")  # a crash mid-line, earlier
    write_tiny_bundle(root, version="v2", publish=False)
    before = (root / "published.log").read_bytes()
    (root / "current").unlink()
    (root / "current").mkdir()  # what `rsync -L` leaves: a directory the link cannot replace
    with pytest.raises(BundleError, match="current is not a symlink"):
        set_current(root, "v2")
    assert (root / "published.log").read_bytes() == before
    assert list_versions(root) == ["v1", "v2"]  # the directory named current is no version
    (root / "current").rmdir()
    os.symlink("v1", root / "current")
    with monkeypatch.context() as patch:
        fail_replacing_current(patch)
        with pytest.raises(BundleError, match="cannot point .*current at v2: .*No space left"):
            set_current(root, "v2")
    assert (root / "published.log").read_bytes() == before
    assert current_version(root) == "v1"
    set_current(root, "v2")  # the next entry starts a line of its own
    assert (root / "published.log").read_text().splitlines()[-2:] == ["v0-half-writ", "v2"]


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    """fn(*args) started in a thread; the list gets what it raised, if anything."""
    raised: list = []

    def run() -> None:
        try:
            fn(*args)
        except Exception as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def test_prune_and_rollback_exclude_each_other(tmp_path, monkeypatch):
    # Retention chose v1 to go while a rollback to v1 ran: `current` ended up naming a deleted
    # version (113 of 150 trials of two real processes), and no worker could start. The root's
    # lock orders them: a rollback waits out the taking-out and then finds v1 gone; a prune
    # waits out a rollback's switch and then keeps what it made current.
    root = tmp_path / "bundles"
    for name in ("v1", "v2", "v3"):
        write_tiny_bundle(root, version=name)
    real_rename, real_record = os.rename, bundle._record_published
    threads = []

    def rollback_meanwhile(src, dst):
        if Path(dst).name.startswith(".deleting-v1"):
            threads.append(in_thread(set_current, root, "v1"))
            time.sleep(0.3)
            assert threads[-1][0].is_alive(), "the rollback did not wait for the lock"
        real_rename(src, dst)

    monkeypatch.setattr(bundle.os, "rename", rollback_meanwhile)
    assert prune(root, keep=1) == ["v1", "v2"]
    thread, raised = threads.pop()
    thread.join(10)
    assert [str(e) for e in raised] == [f"no bundle version 'v1' in {root}"]
    assert current_version(root) == "v3" and list_versions(root) == ["v3"]
    monkeypatch.undo()

    write_tiny_bundle(root, version="v4")

    def prune_meanwhile(root_, version):
        if version == "v3":
            threads.append(in_thread(prune, root, 1))  # v3 is to go, unless current again
            time.sleep(0.3)
            assert threads[-1][0].is_alive(), "prune did not wait for the lock"
        return real_record(root_, version)

    monkeypatch.setattr(bundle, "_record_published", prune_meanwhile)
    set_current(root, "v3")
    thread, raised = threads.pop()
    thread.join(10)
    assert not raised and current_version(root) == "v3" and "v3" in list_versions(root)
    assert not [p for p in root.iterdir() if p.name.startswith(".deleting-")]


def test_a_manifest_that_is_no_object_leaves_the_other_versions_listed(tmp_path):
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2")
    (root / "v1" / "manifest.json").write_text("null")
    assert set(list_versions(root)) == {"v1", "v2"}  # it raised AttributeError
    assert prune(root, keep=1) == ["v1"]


def test_an_unreadable_version_is_a_bundle_error(tmp_path, monkeypatch):
    # An OSError (a version's files chmod 000) escaped as itself: one unreadable old version
    # failed every nightly run after its training (the drift guard reads recent versions).
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    write_tiny_bundle(root, version="v2")
    manifest = root / "v1" / "manifest.json"
    manifest.unlink()
    manifest.mkdir()  # IsADirectoryError: unreadable even where tests run as root
    with pytest.raises(BundleError, match="cannot read .*manifest.json: .*Is a directory"):
        read_manifest(root / "v1")

    def unreadable(path: Path) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(bundle, "sha256_of", unreadable)
    with pytest.raises(BundleError, match="cannot read bundle .*v2: .*Permission denied"):
        load_bundle(root / "v2")


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import faiss
from remi_core.bundle import BundleError
from tests.helpers import TINY, tiny_item_ids, write_tiny_bundle
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
if sys.argv[2] == "encoder":
    resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
else:  # the disk fills up as the index is written: early, or at its last block
    write_index, serialize_index = faiss.write_index, faiss.serialize_index
    def cap(index):
        whole = faiss.VectorIOWriter()  # serialize_index itself calls faiss.write_index
        write_index(index, whole)
        size = 1000 if sys.argv[2] == "index" else whole.data.size() - 64
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    def capped_write(index, *rest):
        cap(index)
        write_index(index, *rest)
    def capped_serialize(index):
        cap(index)
        return serialize_index(index)
    faiss.write_index, faiss.serialize_index = capped_write, capped_serialize
try:
    write_tiny_bundle(Path(sys.argv[1]), version="v2")
except BundleError as exc:
    print(exc)
"""


@pytest.mark.parametrize("failing", ["encoder", "index", "index-tail"])
def test_a_write_that_fails_midway_is_a_bundle_error_and_leaves_nothing(tmp_path, failing):
    """A real failed write (files capped below the encoder's size, or the index's, as on a full
    disk): one error naming the version and the root, no temporary directory left, `current`
    unchanged. faiss's writer only printed an error at its last block's close, and the
    cut-short index was published with a checksum of what was there."""
    root = tmp_path / "bundles"
    write_tiny_bundle(root, version="v1")
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(root), failing],
        capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"cannot write bundle version v2 in {root}" in out.stdout
    assert sorted(p.name for p in root.iterdir()) == [
        ".switch.lock",
        "current",
        "published.log",
        "v1",
    ]
    assert load_bundle(root).version == "v1"


def test_a_model_with_nan_weights_is_neither_written_nor_served(tmp_path):
    """A diverged training run (NaN weights) makes every score NaN: export refuses it, and a
    bundle holding one (its encoder file edited here) is refused at load."""
    path = write_tiny_bundle(tmp_path / "bundles")
    state = load_file(str(path / "encoder.safetensors"))
    name = next(k for k in sorted(state) if k != "item_embedding.weight")
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(path / "encoder.safetensors"))
    with pytest.raises(BundleError, match=f"NaN or infinite weights in {name}"):
        load_bundle(path, verify=False)

    manifest = json.loads((path / "manifest.json").read_text())
    encoder = build_encoder(EncoderConfig.from_dict(manifest["model"]))
    encoder.load_state_dict(state)
    item_ids = json.loads((path / "item_ids.json").read_text())
    with pytest.raises(ValueError, match=f"NaN or infinite weights in {name}"):
        write_bundle(
            tmp_path / "other", encoder=encoder, item_ids=item_ids,
            popularity=np.arange(1, 5), metadata={},
        )  # fmt: skip
    assert not (tmp_path / "other").exists() or not list((tmp_path / "other").iterdir())


@pytest.mark.parametrize(
    ("popularity", "says"),
    [
        ([[3, 4], [5, 6]], "must be a list of catalogue rows"),
        ([5, 5, 7], "lists a row twice"),
        # Cast to int64 these were rows 2 and 3: loaded, and served as the popularity list.
        ([2.5, 3.9], "must be a list of catalogue rows (whole numbers)"),
        ([2**70], "must be a list of catalogue rows (whole numbers)"),  # an OverflowError
    ],
)
def test_a_bad_popularity_list_is_neither_written_nor_served(tmp_path, popularity, says):
    # The list a user with no known item gets: served as it is, a row twice is an item twice,
    # and a nested list failed every such request (500) after the bundle had loaded.
    path = write_tiny_bundle(tmp_path / "bundles")
    (path / "popularity.json").write_text(json.dumps(popularity))
    with pytest.raises(BundleError, match=re.escape(says)):
        load_bundle(path, verify=False)
    with pytest.raises(ValueError, match=re.escape(says)):
        write_bundle(
            tmp_path / "other", encoder=build_encoder(EncoderConfig(**TINY)),
            item_ids=tiny_item_ids(), popularity=np.array(popularity), metadata={},
        )  # fmt: skip


def test_an_index_that_does_not_rank_by_inner_product_is_refused(tmp_path):
    path = write_tiny_bundle(tmp_path / "bundles")
    embeddings = np.load(path / "item_embeddings.npy")
    l2 = faiss.IndexFlatL2(embeddings.shape[1])  # the same vectors, nearest by distance
    l2.add(embeddings[1:])
    faiss.write_index(l2, str(path / "index.faiss"))
    with pytest.raises(BundleError, match="does not rank by inner product"):
        load_bundle(path, verify=False)


def test_the_item_table_is_held_once_and_its_checks_cover_every_block(tmp_path, monkeypatch):
    """load_bundle keeps one (N, d) table for the encoder and the search, checks it in blocks
    (small temporaries at 10M items), and a difference or a NaN in any block is still found."""
    path = write_tiny_bundle(tmp_path / "bundles")
    loaded = load_bundle(path)
    table = loaded.encoder.item_table()
    assert table.data_ptr() == loaded.item_embeddings.ctypes.data
    assert np.array_equal(table.detach().numpy(), np.load(path / "item_embeddings.npy"))

    dim = table.shape[1]
    monkeypatch.setattr(bundle, "CHECK_BLOCK_ELEMENTS", 2 * dim)  # two rows per block
    assert load_bundle(path, verify=False).version == loaded.version
    embeddings = np.load(path / "item_embeddings.npy")
    embeddings[-1, -1] += 1.0  # the last block only
    np.save(path / "item_embeddings.npy", embeddings)
    with pytest.raises(BundleError, match="item_embeddings differ from the encoder's item table"):
        load_bundle(path, verify=False)

    path = write_tiny_bundle(tmp_path / "other")
    state = load_file(str(path / "encoder.safetensors"))
    state["item_embedding.weight"][-1, -1] = float("inf")
    save_file(state, str(path / "encoder.safetensors"))
    np.save(path / "item_embeddings.npy", state["item_embedding.weight"].numpy())  # still equal
    with pytest.raises(BundleError, match="NaN or infinite weights in item_embedding.weight"):
        load_bundle(path, verify=False)


def test_an_encoder_file_without_a_weight_is_a_bundle_error(tmp_path):
    """The encoder is built without storage and takes the file's tensors: a weight missing
    from the file must be a clear error, not a model left holding no data."""
    path = write_tiny_bundle(tmp_path / "bundles")
    state = load_file(str(path / "encoder.safetensors"))
    name = next(k for k in sorted(state) if k != "item_embedding.weight")
    del state[name]
    save_file(state, str(path / "encoder.safetensors"))
    with pytest.raises(BundleError, match=f"Missing key.*{name}"):
        load_bundle(path, verify=False)


ATOMIC_FILLS_UP = """
import resource, signal, sys
from pathlib import Path
from remi_core.atomic import write_json_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    write_json_atomic(Path(sys.argv[1]), ["x" * 100] * 100)
except OSError as exc:
    print(exc)
"""


def test_a_failed_atomic_write_names_its_file(tmp_path):
    # A failed write() names no file: the nightly job said only "[Errno 28] No space left on
    # device" when its events file could not be written.
    target = tmp_path / "events.json"
    out = subprocess.run([sys.executable, "-c", ATOMIC_FILLS_UP, str(target)], capture_output=True,
                         text=True, cwd=Path(__file__).parents[2], timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout and "File too large" in out.stdout
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_an_array_header_declaring_a_huge_shape_is_a_bundle_error(tmp_path):
    # Unverified files (REMI_VERIFY_CHECKSUMS=false): numpy's MemoryError was not caught.
    path = write_tiny_bundle(tmp_path / "bundles")
    table = path / "item_embeddings.npy"
    raw = table.read_bytes()
    end = raw.index(b"\n") + 1
    header = raw[:end].decode("latin1")
    huge = header.replace(f"({TINY['num_items']}, ", f"({10**11}, ")
    assert huge != header
    table.write_bytes((huge[:-1].ljust(len(header) - 1) + "\n").encode("latin1") + raw[end:])
    with pytest.raises(BundleError, match="cannot load bundle .*MemoryError"):
        load_bundle(path, verify=False)
