"""The bundle format (remi_core/bundle.py): checksums, publishing, pruning and rollback."""

import json

import pytest

from remi_core.bundle import (
    BundleError,
    current_version,
    list_versions,
    load_bundle,
    prune,
    set_current,
)
from tests.helpers import write_tiny_bundle


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
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no temporary leftovers"


def test_index_factory_is_recorded(tmp_path):
    path = write_tiny_bundle(tmp_path / "b", index_factory="HNSW16", search_params="efSearch=40")
    bundle = load_bundle(path)
    assert bundle.manifest["index"]["factory"] == "HNSW16"
    assert bundle.manifest["index"]["search_params"] == "efSearch=40"
    assert bundle.index.ntotal == len(bundle.item_ids) - 1
