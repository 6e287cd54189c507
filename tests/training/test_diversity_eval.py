"""Item categories (files, bundles) and the offline accuracy/diversity trade-off."""

import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from remi_core.bundle import BundleError, load_bundle, write_bundle
from tests.helpers import REPO, tiny_item_ids, write_tiny_bundle
from training.categories import read_categories
from training.cli import app
from training.data import DataConfig, DataError, load_dataset
from training.nightly import NightlyConfig, NightlyError

runner = CliRunner()
SHARED = Path(os.environ.get("REMI_DATA_ROOT", REPO / "../shared/data"))
NIGHTLY_TEST = REPO / "configs" / "nightly-test.yaml"
BEAUTY_ATTRIBUTES = SHARED / "amazon_beauty/Beauty_item2attributes.json.gz"


def test_attribute_lists_become_the_most_widespread_attribute(tmp_path):
    path = tmp_path / "attrs.json.gz"
    # attribute 7 is on three items, 9 on two, the others on one
    data = {"a": [1, 7], "b": [7, 9], "c": [9, 2], "d": [7], "e": [], "f": 5}
    with gzip.open(path, "wt") as f:
        json.dump(data, f)
    found = read_categories(path, [None, "a", "b", "c", "d", "e", "f", "new"])
    names = [found.names[c] if c >= 0 else None for c in found.rows]
    assert names == [None, "7", "7", "9", "7", None, "5", None]
    assert found.summary()["items_without_category"] == 2


def test_csv_categories_and_errors(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("item_id,genre\nx,books\ny,games\nx,games\nz,\n")
    found = read_categories(path, [None, "x", "y", "z"], category_col="genre")
    assert found.names == ["books", "games"]
    assert found.rows.tolist() == [-1, 0, 1, -1]
    with pytest.raises(DataError, match="no column"):
        read_categories(path, [None, "x"])
    with pytest.raises(DataError, match="none of the catalogue"):
        read_categories(path, [None, "q"], category_col="genre")
    (tmp_path / "c.txt").write_text("")
    with pytest.raises(DataError, match=".json or .csv"):
        read_categories(tmp_path / "c.txt", [None])


def test_json_categories_with_a_bom_or_an_upper_case_gz_and_only_the_catalogues(tmp_path):
    # A BOM was refused (CSV files take it); CATS.JSON.GZ was read as plain text; a category
    # only items outside the catalogue had was counted in the bundle's categories.
    data = json.dumps({"x": ["books"], "y": ["games"], "outside": ["toys"]})
    bom = tmp_path / "cats.json"
    bom.write_text("\ufeff" + data, encoding="utf-8")
    upper = tmp_path / "CATS.JSON.GZ"
    upper.write_bytes(gzip.compress(data.encode()))
    for path in (bom, upper):
        found = read_categories(path, [None, "x", "y", "z"])
        assert found.names == ["books", "games"] and found.rows.tolist() == [-1, 0, 1, -1]


@pytest.mark.skipif(not BEAUTY_ATTRIBUTES.is_file(), reason="needs ../shared/data")
def test_beauty_attributes_give_seven_top_level_categories():
    ids = [None] + [str(i) for i in range(1, 12102)]
    found = read_categories(BEAUTY_ATTRIBUTES, ids)
    assert len(found.names) == 7 and (found.rows[1:] >= 0).all()


def test_bundle_carries_checksummed_categories(tmp_path):
    plain = load_bundle(write_tiny_bundle(tmp_path / "plain"))
    assert plain.categories is None and plain.category_names is None
    ids = tiny_item_ids()
    rows = np.array([-1] + [i % 3 for i in range(1, len(ids))], dtype=np.int32)
    path = write_bundle(
        tmp_path / "b",
        encoder=plain.encoder,
        item_ids=ids,
        popularity=plain.popularity,
        metadata={},
        categories=(rows, ["a", "b", "c"]),
    )
    bundle = load_bundle(path)
    assert np.array_equal(bundle.categories, rows) and bundle.category_names == ["a", "b", "c"]
    assert set(bundle.manifest["files"]) >= {"item_categories", "category_names"}
    np.save(path / "item_categories.npy", np.zeros_like(rows))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(path)
    with pytest.raises(ValueError, match=r"-1\.\.2"):
        write_bundle(tmp_path / "c", encoder=plain.encoder, item_ids=ids,
                     popularity=plain.popularity, metadata={},
                     categories=(np.where(rows == 2, 3, rows), ["a", "b", "c"]))  # fmt: skip


def test_export_with_categories_and_the_tradeoff(tmp_path):
    """Synthetic ids read <category>-<number>: a CSV of those categories goes into the bundle,
    and the evaluation's diversity climbs with lambda while lambda 0 is plain Eq. 7."""
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "--run-dir", str(run_dir), "--synthetic-users", "300",
                                 "--dim", "8", "--seq-len", "8", "--max-iters", "60",
                                 "--eval-every", "30", "--batch-size", "32", "--device", "cpu",
                                 "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    ids = json.loads((run_dir / "dataset" / "dataset.json").read_text())["item_ids"][1:]
    csv = tmp_path / "cats.csv"
    csv.write_text("item_id,category\n" + "".join(f"{i},{i.split('-')[0]}\n" for i in ids))
    result = runner.invoke(app, ["export", "--run-dir", str(run_dir), "--bundle-root",
                                 str(tmp_path / "b"), "--categories", str(csv)])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", "--run-dir", str(run_dir), "--bundle-root",
                                 str(tmp_path / "b"), "--categories", "gone.csv"])  # fmt: skip
    assert (
        result.exit_code == 2 and "--categories: gone.csv: category file not found" in result.output
    )
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest["categories"]["categories"] == len(bundle.category_names) > 1
    plot = tmp_path / "fig" / "tradeoff.png"
    result = runner.invoke(app, ["evaluate", str(tmp_path / "b"), "--dataset-dir",
                                 str(run_dir / "dataset"), "--diversity", "0,0.05,0.5,5",
                                 "--plot", str(plot)])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    points = out["diversity"]["points"]
    assert out["diversity"]["categories"] == "bundle"
    assert [p["lambda"] for p in points] == [0, 0.05, 0.5, 5]
    assert points[0]["recall@50"] == pytest.approx(out["model"]["recall@50"], abs=1e-6)
    spread = [p["diversity@50"] for p in points]
    assert spread == sorted(spread) and spread[-1] > spread[0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run without categories: the producing interest is the category.
    result = runner.invoke(app, ["evaluate", str(run_dir), "--diversity", "0,1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["diversity"]["categories"] == "producing interest"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "R", "--diversity", "0,x"], "--diversity"),
        (["evaluate", "R", "--diversity", "-1"], "must lie in 0..10"),
        (["evaluate", "R", "--plot", "p.png"], "go with --diversity"),
    ],
)
def test_cli_diversity_errors_name_the_flag(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_plot_without_matplotlib_is_refused_before_the_evaluation(tmp_path, monkeypatch):
    # matplotlib is in the dev extra only (not in `.[train]`, the trainer image's install).
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "R"), "--diversity", "0,1",
                                 "--plot", str(tmp_path / "p.png")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--plot needs matplotlib" in result.output and "Traceback" not in result.output


def test_nightly_bundles_keep_their_categories(tmp_path):
    """The nightly/bootstrap job ships the configured categories in what it publishes."""
    ids = load_dataset(DataConfig(synthetic_users=600)).item_ids[1:]
    csv = tmp_path / "cats.csv"
    csv.write_text("item_id,category\n" + "".join(f"{i},{i.split('-')[0]}\n" for i in ids))
    with pytest.raises(NightlyError, match="categories: nope.csv: file not found"):
        NightlyConfig(categories="nope.csv")
    config = yaml.safe_load(NIGHTLY_TEST.read_text())
    config["export"]["categories"] = str(csv)  # the export: section also sets nightly bundles'
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    root = tmp_path / "bundles"
    args = ["bootstrap", "--config", str(tmp_path / "c.yaml"), "--bundle-root", str(root),
            "--state-dir", str(tmp_path / "state")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    bundle = load_bundle(root)
    assert bundle.categories is not None and (bundle.categories[1:] >= 0).all()


@pytest.mark.parametrize("catalogue", [300, 30])  # 30: fewer items than the lists' 50
def test_lambda_zero_answers_users_without_a_known_item_as_the_model_does(catalogue):
    """Users whose input holds no item the model knows (one-item users, an older bundle on new
    items) get the popularity list in `evaluate_model` and in the service; the diverse
    evaluation ranked them by interests computed from nothing: its lambda-0 Recall@50 was
    0.07 against the model's 0.39 where a third of the users had no input. Below 50 items the
    popularity list was wider than the diverse lists: a shape error."""
    import torch

    from remi_core.models import EncoderConfig, build_encoder
    from training.evaluate import EvalSet, evaluate_diversity, evaluate_model

    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(num_items=catalogue + 1, dim=8, num_interests=3, seq_len=6))
    rng = np.random.default_rng(0)
    popularity = np.arange(catalogue, 0, -1)  # rows, most popular first
    items = torch.as_tensor(rng.integers(1, catalogue + 1, (60, 6)))
    mask = torch.ones(60, 6, dtype=torch.bool)
    mask[::3] = False  # every third user: no known input item
    items[~mask] = 0
    # The truth of the users without input lies in the popularity head, so it counts.
    truth = torch.as_tensor(rng.integers(1, catalogue + 1, (60, 2)))
    truth[::3, 0] = torch.as_tensor(popularity[rng.integers(0, min(50, catalogue), 20)])
    eval_set = EvalSet(items, mask, truth)
    model_recall = evaluate_model(model, eval_set, popularity=popularity)["recall@50"]
    for categories in (None, rng.integers(0, 5, catalogue + 1)):
        point = evaluate_diversity(model, eval_set, [0.0], categories, popularity=popularity)[0]
        assert point["recall@50"] == pytest.approx(model_recall, abs=1e-6)
        assert 0 < point["diversity@50"] <= 1


def test_attribute_values_that_are_no_attribute_are_refused_or_none(tmp_path):
    # null became a category named "None", a nested list one named "[1]".
    path = tmp_path / "attrs.json"
    # null inside a list too; 7.0 is 7 (pandas writes integer ids so beside a missing value)
    path.write_text(json.dumps({"a": [1, 7], "b": None, "c": "7", "d": [None, 7.0], "e": [None]}))
    found = read_categories(path, [None, "a", "b", "c", "d", "e"])
    names = [found.names[c] if c >= 0 else None for c in found.rows]
    assert names == [None, "7", None, "7", "7", None]
    for odd in ([[1]], [{"x": 1}], [True], [1.5]):
        path.write_text(json.dumps({"a": odd}))
        with pytest.raises(DataError, match="item 'a': attributes are strings or whole numbers"):
            read_categories(path, [None, "a"])
    # A trailing comma shifted every column of a CSV, as in the data files.
    csv = tmp_path / "c.csv"
    csv.write_text("item_id,category\nx,books,\n")
    with pytest.raises(DataError, match="more fields than the header"):
        read_categories(csv, [None, "x"])


def test_evaluating_an_empty_split_says_so(tmp_path):
    # Three users split 8:1:1 leave no validation user: "torch.cat(): expected a non-empty
    # list of Tensors" was the message.
    ids = tiny_item_ids()[1:]
    data = tmp_path / "three.csv"
    data.write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},{ids[(u * 7 + i) % 50]},{i}\n" for u in range(3) for i in range(6)))  # fmt: skip
    done = runner.invoke(app, ["prepare", "--data", str(data), "--min-count", "1",
                               "--out", str(tmp_path / "ds")])  # fmt: skip
    assert done.exit_code == 0, done.output
    write_tiny_bundle(tmp_path / "b")
    done = runner.invoke(app, ["evaluate", str(tmp_path / "b"), "--dataset-dir",
                               str(tmp_path / "ds"), "--split", "valid"])  # fmt: skip
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert "the dataset's valid split has no users to evaluate" in done.output
