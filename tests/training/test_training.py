"""Training runs, bundles and the remi-train CLI on small synthetic data."""

import json
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from remi_core.bundle import (
    current_version,
    load_bundle,
)
from remi_core.models import pad_histories
from remi_core.retrieval import dense_merged_topk
from training.cli import app
from training.commands.options import read_config, settings
from training.data import DataConfig, _fingerprint, load_dataset
from training.evaluate import evaluate_bundle
from training.export import ExportConfig, export_run
from training.run_dir import RunDir, RunError
from training.trainer import BatchSampler, TrainConfig, load_run, train

SMALL = TrainConfig(dim=16, num_interests=3, seq_len=10, batch_size=64, max_iters=1200,
                    eval_every=300, patience=4, seed=5, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(DataConfig(synthetic_users=600, synthetic_seed=11))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return train(dataset, SMALL, run_dir, progress=False)


def test_sampler_windows_end_right_before_the_target(dataset):
    sampler = BatchSampler(dataset, seq_len=10, device=torch.device("cpu"))
    items, mask, target = sampler.sample(256, torch.Generator().manual_seed(0))
    assert items.shape == mask.shape == (256, 10)
    lengths = mask.sum(dim=1)
    assert (lengths >= 4).all() and (items[~mask] == 0).all() and (items[mask] > 0).all()
    # Every (window, target) pair must occur contiguously in some training sequence.
    train_seqs = [dataset.sequences[u].tolist() for u in dataset.train]
    for row in range(0, 256, 17):
        window = items[row, : lengths[row]].tolist() + [int(target[row])]
        assert any(
            seq[i : i + len(window)] == window for seq in train_seqs for i in range(len(seq))
        )


def test_small_run_beats_most_popular(trained):
    assert trained.test["recall@50"] > 1.5 * trained.popularity_test["recall@50"]
    assert trained.test["ndcg@50"] > trained.popularity_test["ndcg@50"]
    log = [
        json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["iteration"] for r in log] == [300, 600, 900, 1200]
    assert log[-1]["loss"] < log[0]["loss"]


def test_seeded_cpu_runs_repeat_and_resume_continues_exactly(dataset, trained, tmp_path):
    again = train(dataset, SMALL, tmp_path / "again", progress=False)
    assert again.test == trained.test
    # Stop at 600 steps, then resume to 1200: same weights as the uninterrupted run.
    train(dataset, replace(SMALL, max_iters=600), tmp_path / "split", progress=False)
    resumed = train(dataset, SMALL, tmp_path / "split", resume=True, progress=False)
    config = json.loads((tmp_path / "split" / "config.json").read_text())["train"]
    assert config["max_iters"] == SMALL.max_iters  # the run describes how far it went
    a = load_file(str(trained.run_dir / "best.safetensors"))
    b = load_file(str(tmp_path / "split" / "best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test == trained.test


def test_a_run_directory_in_use_refuses_a_second_training(dataset, trained, tmp_path):
    # Nothing stopped a second `train` (or --resume) in the same directory: the two runs left
    # one's config.json beside the other's weights, result and log, and both exited 0.
    copy = tmp_path / "run"
    shutil.copytree(trained.run_dir, copy)
    before = {f.name: f.read_bytes() for f in copy.iterdir() if f.is_file()}
    with RunDir(copy).training():  # as a training process holds it
        for resume in (False, True):
            with pytest.raises(RunError, match="another process is training in this run"):
                train(dataset, replace(SMALL, max_iters=300), copy, resume, progress=False)
        done = CliRunner().invoke(app, ["train", "--run-dir", str(copy), "--resume"])
        assert done.exit_code == 2 and "another process is training" in done.output
        assert "Traceback" not in done.output
    assert {f.name: f.read_bytes() for f in copy.iterdir() if f.is_file()} == before
    # Released when the holder is done: the directory trains again.
    assert train(dataset, replace(SMALL, max_iters=300), copy, progress=False).iterations == 300


@pytest.mark.parametrize("model_type", ["mind", "gru4rec"])
def test_resume_continues_the_global_random_stream(dataset, model_type, tmp_path):
    # MIND's routing start and GRU4Rec's dropout draw from the global generator, so resuming
    # is exact only if last.pt carries that stream too.
    cfg = replace(SMALL, model_type=model_type, max_iters=200, eval_every=100, patience=10)
    whole = train(dataset, cfg, tmp_path / "whole", progress=False)
    train(dataset, replace(cfg, max_iters=100), tmp_path / "split", progress=False)
    train(dataset, cfg, tmp_path / "split", resume=True, progress=False)
    a = torch.load(whole.run_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bundle_round_trip_gives_the_same_scores(trained, tmp_path):
    path = export_run(trained.run_dir, tmp_path / "bundles")
    bundle = load_bundle(tmp_path / "bundles")
    assert bundle.path == path.resolve() and current_version(tmp_path / "bundles") == path.name
    manifest = bundle.manifest
    assert manifest["model"]["model_type"] == "comirec-sa" and manifest["num_items"] == len(
        bundle.item_ids
    )
    assert manifest["metrics"]["test"] == pytest.approx(trained.test)
    assert manifest["dataset"]["sha256"] and manifest["training"]["settings"]["beta"] == SMALL.beta
    model, dataset, _ = load_run(trained.run_dir)
    items, mask = pad_histories([s[:8] for s in dataset.sequences[:5]], SMALL.seq_len)
    with torch.inference_mode():
        expected, _ = model(items, mask)
        actual, _ = bundle.encoder(items, mask)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert evaluate_bundle(bundle, dataset) == pytest.approx(trained.test)
    _, rows = dense_merged_topk(actual, torch.from_numpy(bundle.item_embeddings), 10)
    assert all(bundle.item_ids[r] for r in rows.flatten().tolist())


def test_a_user_the_bundle_knows_nothing_of_is_ranked_by_popularity(trained, tmp_path):
    # Tonight's data may hold a user whose history is all new items: the service answers them
    # from the bundle's popularity list, so evaluating that bundle must rank them the same way.
    bundle = load_bundle(export_run(trained.run_dir, tmp_path / "bundles").parent)
    _, dataset, _ = load_run(trained.run_dir)
    favourite = dataset.item_ids.index(bundle.item_ids[bundle.popularity[0]])
    new_items = [f"never-seen-{i}" for i in range(4)]
    new_rows = np.arange(len(dataset.item_ids), len(dataset.item_ids) + 4)
    user = int(dataset.test[0])
    sequences = list(dataset.sequences)
    sequences[user] = np.array([*new_rows, favourite], dtype=np.int64)  # input: the 4 new items
    tonight = replace(
        dataset,
        item_ids=dataset.item_ids + new_items,
        sequences=sequences,
        test=np.array([user]),
    )
    metrics = evaluate_bundle(bundle, tonight)
    assert metrics["hitrate@20"] == 1.0 and metrics["recall@20"] == 1.0
    assert metrics["ndcg@20"] == 1.0  # the most popular item, ranked first


def test_training_metrics_rank_a_user_with_no_input_by_popularity(dataset, tmp_path):
    # A one-item sequence leaves nothing to encode (its only item is the truth). The exported
    # bundle answers such a user from popularity, and `evaluate_bundle` ranks them so: the run's
    # own test metrics, which the nightly gate compares with it, must do the same.
    user = int(dataset.test[0])
    sequences = list(dataset.sequences)
    sequences[user] = dataset.popularity()[:1].copy()
    # A dataset states its own fingerprint, which loading it checks.
    fingerprint = _fingerprint(dataset.item_ids, dataset.user_ids, sequences)
    one = replace(dataset, sequences=sequences, test=np.array([user]), fingerprint=fingerprint)
    result = train(
        one, replace(SMALL, max_iters=20, eval_every=20), tmp_path / "run", progress=False
    )
    assert result.test["hitrate@20"] == 1.0 and result.test["ndcg@20"] == 1.0
    bundle = load_bundle(export_run(result.run_dir, tmp_path / "bundles").parent)
    assert evaluate_bundle(bundle, one) == pytest.approx(result.test)


runner = CliRunner()


def test_cli_trains_exports_and_evaluates_with_a_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "data:\n  synthetic_users: 300\n"
        "train:\n  dim: 8\n  seq_len: 8\n  max_iters: 50\n  eval_every: 25\n  batch_size: 32\n"
        "  device: cpu\n"
    )
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "-c", str(config), "--run-dir", str(run_dir),
                                 "--max-iters", "75", "--amp", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{") :])
    assert out["iterations"] == 75  # the flag overrides the file
    stored = json.loads((run_dir / "config.json").read_text())["train"]
    assert stored["dim"] == 8 and stored["max_iters"] == 75
    assert stored["amp"] is True and stored["compile"] is False
    result = runner.invoke(app, ["export", "--run-dir", str(run_dir),
                                 "--bundle-root", str(tmp_path / "b")])  # fmt: skip
    assert result.exit_code == 0, result.output
    # A bundle root that cannot be written (here a file): one line naming it, exit 2.
    (tmp_path / "a-file").write_text("")
    result = runner.invoke(app, ["export", "--run-dir", str(run_dir),
                                 "--bundle-root", str(tmp_path / "a-file")])  # fmt: skip
    assert result.exit_code == 2 and str(tmp_path / "a-file") in result.output, result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "b"), "--dataset-dir",
                                 str(run_dir / "dataset")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "most_popular" in json.loads(result.stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--run-dir", "R", "--data", "missing.csv"], "missing.csv: file not found"),
        (["train", "--run-dir", "R", "-c", "nope.yaml"], "--config: nope.yaml does not exist"),
        (["export", "--run-dir", "nowhere", "--bundle-root", "B"], "--run-dir: nowhere"),
        (["train", "--run-dir", "R", "--device", "cuda:3", "--synthetic-users", "50"], "CUDA"),
        (["evaluate", "R", "--split", "train"], "--split"),
        (["train", "--run-dir", "R", "--eval-every", "0"], "eval_every must be at least 1"),
        (["train", "--run-dir", "R", "--beta", "-1"], "beta must be a finite number >= 0"),
        # NaN slips past `< 0`: the run "finished" with NaN weights, the nightly job published.
        (["train", "--run-dir", "R", "--beta", "nan"], "beta (--beta, or `train: beta` in"),
        (["train", "--run-dir", "R", "--rr-lambda", "inf"], "must be a finite number, not inf"),
        (["nightly", "--bundle-root", "B", "--tolerance", "nan"], "tolerance (--tolerance, or"),
        (["nightly", "--bundle-root", "B", "--lock-ttl", "nan"], "lock_ttl_s (--lock-ttl, or"),
        (["train", "--run-dir", "R", "-c", "."], "--config: . is a directory"),
        (["prepare", "--data", "latin1.txt", "--out", "D"], "latin1.txt: cannot read as seq"),
        (["prepare", "--data", "plain.txt.gz", "--out", "D"], "plain.txt.gz: cannot read as seq"),
        (["versions", "--bundle-root", "nowhere"], "--bundle-root: nowhere is not a directory"),
        (["train", "--run-dir", "R", "--routing-grad"], "routing_grad applies to comirec-dr, mind"),
        (["evaluate", "R", "--dataset-dir", "nowhere"], "R does not exist (a run directory"),
        # A misspelled run directory was told that --dataset-dir is required for a bundle.
        (["evaluate", "runs/typo"], "runs/typo does not exist"),
        (["train", "--run-dir", "R", "--device", "cuda:x"], "device must be 'auto', 'cpu', 'cuda'"),
        # A device torch names but training cannot use was a traceback deep in training.
        (["train", "--run-dir", "R", "--device", "meta"], "device must be 'auto', 'cpu', 'cuda'"),
        (["train", "--run-dir", "R", "--device", "mps"], "device must be 'auto', 'cpu', 'cuda'"),
        # Seeds past torch's and numpy's ranges: messages that named no setting.
        (["train", "--run-dir", "R", "--seed", str(2**64)], "seed must be a whole number from -2"),
        (["train", "--run-dir", "R", "--synthetic-seed", "-1"], "synthetic_seed must be at least"),
        # Settings past the memory: the allocator's traceback, at the start or the first step.
        (
            ["train", "--run-dir", "R", "--synthetic-users", "300", "--dim", str(10**8)],
            "out of memory for these settings (dim 100000000",
        ),
        (
            ["train", "--run-dir", "R", "--synthetic-users", "300", "--negatives", str(10**11)],
            "out of memory for these settings (dim 64, interests 4, seq_len 20, batch_size 128, "
            "negatives 100000000000)",
        ),
        # The nightly jobs read the export: section too; a misspelled key was a KeyError there.
        (["bootstrap", "-c", "typo.yaml", "--bundle-root", "B"], "unknown export setting(s)"),
        (["nightly", "-c", "typo.yaml", "--bundle-root", "B"], "['index_factroy']; known:"),
    ],
)
def test_cli_errors_name_the_flag_or_file(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    Path("latin1.txt").write_bytes("user-1 caf\xe9 th\xe9\n".encode("latin-1"))
    Path("plain.txt.gz").write_text("user-1 a b\n")  # named .gz, not compressed
    Path("typo.yaml").write_text("export:\n  index_factroy: Flat\n")
    if torch.cuda.is_available() and "cuda:3" in args:
        pytest.skip("a CUDA host may have that device")
    overcommit = Path("/proc/sys/vm/overcommit_memory")
    if "out of memory" in message and overcommit.is_file() and overcommit.read_text() == "1\n":
        pytest.skip("with overcommit_memory=1 the allocation may succeed and the OOM killer act")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_rejects_unknown_config_keys(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"dimension": 8}}))
    result = runner.invoke(app, ["train", "-c", str(config), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "dimension" in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: 5\n", "the train: section must be a mapping of settings, not 5"),
        ("train: [1, 2]\n", "the train: section must be a mapping"),
        ("train:\n  dim: 8.5\n", "dim (--dim, or `train: dim` in --config) must be a whole number"),
        ("train:\n  amp: 'no'\n", "amp (--amp, or `train: amp` in --config) must be true or false"),
        ("train:\n  device: 3\n", "device (--device, or `train: device` in --config) must be a"),
        ("data:\n  min_count: five\n", "min_count (--min-count, or `data: min_count`"),
        ("train:\n  lr: .nan\n", "lr (--lr, or `train: lr` in --config) must be a finite number"),
        (b"train:\n  dim: \xff\n", "cannot parse"),
    ],
)
def test_config_values_of_the_wrong_type_name_their_setting(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = runner.invoke(app, ["train", "-c", str(config), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_config_sections_left_empty_and_yaml_floats_without_a_dot_are_read(tmp_path):
    config = tmp_path / "c.yaml"
    # `1e-3` (YAML 1.1 reads it as a string), a whole float for an int, sections left empty.
    config.write_text("data:\ntrain:\n  lr: 1e-3\n  max_iters: 2.0e+3\nexport:  # later\n")
    file = read_config(config)
    assert "data" not in file and "export" not in file
    cfg = settings(TrainConfig, file, "train")
    assert cfg.lr == 0.001 and cfg.max_iters == 2000 and isinstance(cfg.max_iters, int)
    assert settings(DataConfig, file, "data") == DataConfig()


def test_a_new_run_with_bad_settings_leaves_the_old_run_in_its_directory(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    # AdamW refused the rate after config.json was rewritten (dim 32 now), which left the old
    # checkpoint unloadable under the new settings; the settings are checked first now.
    result = runner.invoke(app, ["train", "--run-dir", str(run_dir), "--synthetic-users", "300",
                                 "--dim", "32", "--lr", "nan", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2 and "lr (--lr, or" in result.output, result.output
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before, result.output
    result = runner.invoke(app, ["export", "--run-dir", str(run_dir),
                                 "--bundle-root", str(tmp_path / "b")])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_new_run_in_an_old_runs_directory_replaces_all_of_it(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    result = runner.invoke(app, ["train", "--run-dir", str(run_dir), "--synthetic-users", "300",
                                 "--dim", "8", "--seq-len", "8", "--batch-size", "32",
                                 "--max-iters", "20", "--eval-every", "10", "--device", "cpu",
                                 "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    model, dataset, cfg = load_run(run_dir)
    assert cfg.dim == 8 and model.item_table().shape == (dataset.num_items, 8)
    assert len(RunDir(run_dir).read_metrics()) == 2  # its own validations only


def test_resume_refuses_settings_it_would_drop_and_takes_max_iters_and_device(trained, tmp_path):
    # --lr 5 --model mind --data missing.csv were dropped without a word: the run went on.
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    (tmp_path / "c.yaml").write_text("train:\n  lr: 5\n")
    resume = ["train", "--run-dir", str(run_dir), "--resume", "--no-progress"]
    done = runner.invoke(app, [*resume, "--lr", "5", "--model", "mind", "--data", "x.csv",
                               "--config", str(tmp_path / "c.yaml")])  # fmt: skip
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert "only --max-iters and --device may change, not --model, --lr, --data, --config" in (
        done.output
    )
    done = runner.invoke(app, [*resume, "--max-iters", "1500", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert RunDir(run_dir).train_config().max_iters == 1500


def test_a_diverged_run_stops_with_one_line_and_saves_nothing_as_best(tmp_path):
    # --lr 1e4: NaN weights were validated (every score NaN), saved as best, and the run
    # finished with exit 0 and a recall in result.json; only export refused it.
    run_dir = tmp_path / "run"
    done = runner.invoke(app, ["train", "--run-dir", str(run_dir), "--synthetic-users", "300",
                               "--max-iters", "60", "--eval-every", "20", "--dim", "16",
                               "--batch-size", "32", "--lr", "1e4", "--no-progress"])  # fmt: skip
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert "training diverged before iteration 20: the weights are NaN or infinite" in done.output
    assert not (run_dir / "best.safetensors").exists() and not (run_dir / "result.json").exists()


def test_a_misspelt_config_section_is_refused(tmp_path):
    # `trian:` was ignored: the run trained with the default settings and exited 0.
    config = tmp_path / "c.yaml"
    config.write_text("trian:\n  dim: 8\n")
    done = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "r"), "--config", str(config)])
    assert done.exit_code == 2 and "unknown section(s) trian" in done.output
    assert not (tmp_path / "r").exists()


def _edit_last(run_dir: Path, edit) -> None:
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, run_dir / "last.pt")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ck: ck.update(state={"iterations": 5}), "unexpected keyword argument"),
        (lambda ck: ck.update(generator=torch.zeros(3, 3)), "last.pt: cannot be read"),
        (lambda ck: ck["optimizer"]["param_groups"].append({}), "last.pt: cannot be read"),
        (lambda ck: ck.update(model=[1, 2]), "last.pt: cannot be read"),
        ("junk", "last.pt: cannot be read to resume the run"),
        # torch.load's OSError: "error: [Errno 22] Invalid argument", naming no file.
        ("cut", "last.pt: cannot be read to resume the run"),
    ],
)
def test_a_damaged_last_checkpoint_is_one_line_naming_it(dataset, trained, tmp_path, edit, message):
    # Tracebacks before: struct.error for junk text, TypeError for a bad state, and others.
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    if edit == "junk":
        (run_dir / "last.pt").write_text("junk")
    elif edit == "cut":
        (run_dir / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:5000])
    else:
        _edit_last(run_dir, edit)
    with pytest.raises(RunError, match=message):
        train(dataset, SMALL, run_dir, resume=True, progress=False)
    assert (run_dir / "result.json").is_file()  # nothing trained: the run is still finished


def test_a_finished_run_resumed_and_stopped_is_not_finished(
    dataset, trained, tmp_path, monkeypatch, caplog
):
    # Its result.json stayed: an export published the resumed run's weights with the first
    # run's metrics and best_iteration, and the run directory said "finished".
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)

    def stop(path, session):
        raise KeyboardInterrupt  # as Ctrl-C at the resumed run's first validation

    monkeypatch.setattr("training.trainer._save_last", stop)
    with pytest.raises(KeyboardInterrupt):
        train(dataset, replace(SMALL, max_iters=1500), run_dir, resume=True, progress=False)
    assert not (run_dir / "result.json").exists()
    path = export_run(run_dir, tmp_path / "bundles")
    assert "has not finished (no result.json)" in caplog.text
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["metrics"]["valid"] == {}
    assert "best_iteration" not in manifest["training"]


def test_a_run_resumes_from_another_device_or_an_older_checkpoint(dataset, tmp_path, caplog):
    # A run trained on a GPU host carries a CUDA generator state (16 bytes, not the CPU's
    # 5,056): resuming it on a CPU host was a traceback, as was a last.pt from before the global
    # random stream was saved (2026-11-25). Both go on, from seeds, and say so.
    cfg = replace(SMALL, max_iters=300, eval_every=150)
    train(dataset, cfg, tmp_path / "run", progress=False)
    cuda_state = torch.tensor(list((2023).to_bytes(8, "little")) + [0] * 8, dtype=torch.uint8)
    _edit_last(tmp_path / "run", lambda ck: ck.update(generator=cuda_state))
    _edit_last(tmp_path / "run", lambda ck: ck.pop("global_rng"))
    resumed = train(dataset, replace(cfg, max_iters=450), tmp_path / "run", True, False)
    assert resumed.iterations == 450
    assert "saved on another kind of device" in caplog.text
    assert "no global random stream saved" in caplog.text


def test_a_resumed_run_logs_each_validation_once(dataset, tmp_path):
    # A validation's line is written before its last.pt: a run killed (or out of disk) between
    # the two resumed from the earlier last.pt and logged that validation again.
    cfg = replace(SMALL, max_iters=300, eval_every=150)
    train(dataset, cfg, tmp_path / "run", progress=False)
    log = tmp_path / "run" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([*lines, lines[-1].replace('"iteration": 300', '"iteration": 450')])
                   + '\n{"iteration": 6')  # fmt: skip
    train(dataset, replace(cfg, max_iters=450), tmp_path / "run", resume=True, progress=False)
    assert [r["iteration"] for r in RunDir(tmp_path / "run").read_metrics()] == [150, 300, 450]


@pytest.mark.parametrize(
    ("damage", "command", "message"),
    [
        ("dim", "export", "best.safetensors: cannot be read with the settings in"),
        ("weights", "export", "best.safetensors: cannot be read"),
        ("weights", "evaluate", "best.safetensors: cannot be read"),
        ("last", "resume", "last.pt: cannot be read to resume the run"),
        ("dataset.json", "evaluate", "damaged prepared dataset (no 'name')"),
        ("sequences.npz", "evaluate", "damaged prepared dataset (BadZipFile"),
        ("sequences.npz", "train", "damaged prepared dataset (BadZipFile"),
        # Readable files whose contents are wrong: an IndexError traceback, or read silently.
        ("weights", "resume", "best.safetensors: cannot be read to resume the run"),
        ("items", "evaluate", "damaged prepared dataset (items must be catalogue rows 1.."),
        ("test", "export", "damaged prepared dataset (test must hold user indices 0.."),
        ("lengths", "evaluate", "damaged prepared dataset (lengths must be"),
        ("swap", "evaluate", "(its sequences or ids do not match its fingerprint)"),
        # A hand-edited config.json: a TypeError traceback in evaluate, export and --resume.
        ("float dim", "evaluate", "no valid training settings (dim must be of type int, not 16.0"),
        ("float dim", "resume", "no valid training settings (dim must be of type int, not 16.0"),
        # result.json: an AttributeError traceback, or a JSON error naming no file.
        ("result list", "export", "result.json: not a run's result (a JSON object)"),
        ("result cut", "export", "result.json: Expecting"),
    ],
)
def test_a_damaged_run_directory_is_one_line_naming_the_file(
    trained, tmp_path, damage, command, message
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    npz = run_dir / "dataset" / "sequences.npz"
    if damage in ("items", "test", "lengths", "swap"):
        arrays = dict(np.load(npz))
        if damage == "items":
            arrays["items"][5] = 10**6
        elif damage == "test":
            arrays["test"][0] = 99_999
        elif damage == "lengths":
            arrays["lengths"][0] += 1
        else:  # two items of the first user swapped: every array still in range
            arrays["items"][[0, 1]] = arrays["items"][[1, 0]]
            assert arrays["items"][0] != arrays["items"][1]
        np.savez(npz, **arrays)
    elif damage in ("dim", "float dim"):  # a checkpoint of another shape than its settings
        config = json.loads((run_dir / "config.json").read_text())
        config["train"]["dim"] = 2 * config["train"]["dim"] if damage == "dim" else 16.0
        (run_dir / "config.json").write_text(json.dumps(config))
    elif damage.startswith("result"):
        result = run_dir / "result.json"
        result.write_text("[]" if damage == "result list" else result.read_text()[:20])
    else:
        path = {"weights": run_dir / "best.safetensors", "last": run_dir / "last.pt"}.get(
            damage, run_dir / "dataset" / damage
        )
        path.write_bytes(b"{}" if damage == "dataset.json" else path.read_bytes()[:300])
    args = {
        "export": ["export", "--run-dir", str(run_dir), "--bundle-root", str(tmp_path / "b")],
        "evaluate": ["evaluate", str(run_dir)],
        "resume": ["train", "--run-dir", str(run_dir), "--resume", "--no-progress"],
        "train": ["train", "--run-dir", str(tmp_path / "r2"), "--dataset-dir",
                  str(run_dir / "dataset"), "--no-progress"],
    }[command]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_too_few_users_to_validate_on_is_said_so(tmp_path):
    result = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "r"), "--synthetic-users",
                                 "5", "--min-count", "1", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "no validation users" in result.output and "too few users" in result.output


def test_a_full_disk_while_training_is_one_line_and_exit_2(tmp_path):
    # torch.save reports a failed write as RuntimeError "unexpected pos": a traceback and exit 1
    # where the CLI promises one line naming the file and exit 2 for a full disk.
    def small_files() -> None:  # in the child: writes past 150 kB fail (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    command = [
        sys.executable, "-m", "training.cli", "train", "--run-dir", str(tmp_path / "run"),
        "--synthetic-users", "300", "--dim", "32", "--seq-len", "8", "--batch-size", "32",
        "--max-iters", "20", "--eval-every", "10", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    # The dataset (92 kB) and best.safetensors (100 kB) fit; last.pt (model and Adam) does not.
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=240, preexec_fn=small_files,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot write" in done.stderr and "is the disk full?" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_directory_describes_itself(trained):
    files = {p.name for p in Path(trained.run_dir).iterdir()}
    assert {"config.json", "dataset", "metrics.jsonl", "best.safetensors", "last.pt",
            "result.json"} <= files  # fmt: skip
    model, dataset, cfg = load_run(trained.run_dir)
    assert cfg == SMALL and model.item_table().shape == (dataset.num_items, SMALL.dim)
    assert np.isfinite(model.item_table().detach().numpy()).all()


def test_an_empty_index_setting_is_unset() -> None:
    # "" (a blank variable in a template) exported an untuned IVF index (recall@50 0.53, default
    # nprobe) or a Flat one whatever the catalogue's size, recorded as chosen by the operator.
    blank = ExportConfig(index_factory=" ", search_params="")
    assert (blank.index_factory, blank.search_params) == (None, None)
    given = ExportConfig(index_factory="IVF16,Flat", search_params="nprobe=4")
    assert (given.index_factory, given.search_params) == ("IVF16,Flat", "nprobe=4")


def test_a_prepared_dataset_refuses_data_settings_it_would_drop(trained, tmp_path):
    # --min-count 50 beside --dataset-dir trained on the unfiltered data, and exited 0.
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  min_count: 50\n")
    base = ["train", "--run-dir", str(tmp_path / "r"), "--dataset-dir",
            str(trained.run_dir / "dataset"), "--no-progress"]  # fmt: skip
    for extra, named in ((["--min-count", "50"], "--min-count"),
                         (["--config", str(config)], "the config's data: section")):  # fmt: skip
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert "--dataset-dir trains on a prepared dataset as it is" in result.output
        assert named in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()
