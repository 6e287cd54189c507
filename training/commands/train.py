"""Commands for one model: prepare the data, train, evaluate, export a bundle."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from remi_core.bundle import load_bundle
from remi_core.diversity import MAX_DIVERSITY
from training.categories import read_categories
from training.commands.options import (
    CliError,
    ConfigOpt,
    config_options,
    echo_json,
    read_config,
    settings,
)
from training.config import TrainConfig
from training.data import DataConfig, DataError, SequenceDataset, load_dataset
from training.diversity_plot import tradeoff_plot
from training.evaluate import (
    bundle_eval_set,
    evaluate_diversity,
    evaluate_model,
    evaluate_popularity,
    make_eval_set,
)
from training.export import ExportConfig, export_run
from training.run_dir import RunDir, RunError
from training.trainer import load_run, train

DatasetDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dataset-dir",
        help="A directory written by `prepare`, trained on as it is (instead of --data and the "
        "other data settings).",
    ),
]


DATA_FLAGS = {"source": ("--data",)}
TRAIN_FLAGS = {
    "model_type": ("--model",),
    "num_interests": ("--interests", "-K"),
    "num_negatives": ("--negatives",),
}


@config_options(DataConfig, "data", **DATA_FLAGS)
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the prepared dataset.")],
    config: ConfigOpt = None,
    *,
    data_flags: dict[str, Any],
) -> None:
    """Read interactions, filter, map ids, split users, and save the dataset to --out."""
    dataset = load_dataset(settings(DataConfig, read_config(config), "data", **data_flags))
    dataset.save(out)
    echo_json(dataset.summary())


@config_options(TrainConfig, "train", **TRAIN_FLAGS)
@config_options(DataConfig, "data", **DATA_FLAGS)
def train_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where checkpoints and logs go.")],
    config: ConfigOpt = None,
    dataset_dir: DatasetDirOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --run-dir from its last.pt.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    *,
    data_flags: dict[str, Any],
    train_flags: dict[str, Any],
) -> None:
    """Train a REMI model (ComiRec-SA + IHN + RR) and keep the best validation checkpoint.

    Data and training settings come from the config file's data: and train: sections and the
    flags; --resume takes them from the run itself (only --max-iters and --device may change).
    """
    file = read_config(config)
    if resume:
        # Other settings were dropped without a word (--lr 5 --model mind trained on as before).
        refused = [_flag(name, TRAIN_FLAGS) for name in train_flags if name not in RESUMABLE]
        refused += [_flag(name, DATA_FLAGS) for name in data_flags]
        refused += [name for name, value in (("--config", config), ("--dataset-dir", dataset_dir))
                    if value is not None]  # fmt: skip
        if refused:
            raise CliError(
                f"--resume continues the run with its own settings; only --max-iters and "
                f"--device may change, not {', '.join(refused)}"
            )
        dataset, cfg = _resumed(RunDir(run_dir), train_flags)
    else:
        if dataset_dir is not None:
            # A prepared dataset is already read and filtered: data settings would be dropped
            # without a word (--min-count 50 trained on the unfiltered data).
            refused = [_flag(name, DATA_FLAGS) for name in data_flags]
            refused += ["the config's data: section"] if file.get("data") else []
            if refused:
                raise CliError(
                    f"--dataset-dir trains on a prepared dataset as it is; drop "
                    f"{', '.join(refused)} (or prepare it again with them)"
                )
            dataset = SequenceDataset.load(dataset_dir)
        else:
            dataset = load_dataset(settings(DataConfig, file, "data", **data_flags))
        cfg = settings(TrainConfig, file, "train", **train_flags)
    typer.echo(f"data: {json.dumps(dataset.summary())}", err=True)
    result = train(dataset, cfg, run_dir, resume=resume, progress=progress)
    echo_json(
        {
            "run_dir": str(result.run_dir),
            "best_iteration": result.best_iteration,
            "iterations": result.iterations,
            "seconds": round(result.seconds, 2),
            "valid": result.valid,
            "test": result.test,
            "most_popular_test": result.popularity_test,
        }
    )


# What a resumed run may change: how far it goes, and where (a GPU run on a CPU host).
RESUMABLE = ("max_iters", "device")


def _flag(name: str, flags: dict[str, tuple[str, ...]]) -> str:
    return flags.get(name, (f"--{name.replace('_', '-')}",))[0]


def _resumed(run: RunDir, train_flags: dict[str, Any]) -> tuple[SequenceDataset, TrainConfig]:
    """The run's own dataset and settings, with the RESUMABLE ones given on the command line."""
    if not run.exists():
        raise CliError(f"--resume: {run.path} holds no run (config.json missing)")
    cfg = replace(run.train_config(), **{k: train_flags[k] for k in RESUMABLE if k in train_flags})
    return run.load_dataset(), cfg


def evaluate(
    path: Annotated[
        Path, typer.Argument(help="A run directory, a bundle version or a bundle root.")
    ],
    split: Annotated[str, typer.Option(help="valid or test.")] = "test",
    dataset_dir: Annotated[
        Path | None,
        typer.Option("--dataset-dir", help="Dataset to evaluate a bundle on (default: the run's)."),
    ] = None,
    diversity: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated lambdas of ComiRec's diverse aggregation, e.g. 0,0.05,0.1: "
            "adds Recall/HitRate/Diversity@50 per lambda."
        ),
    ] = None,
    categories: Annotated[
        Path | None,
        typer.Option(
            help="Item-category file for --diversity (JSON or CSV, see `export --categories`); "
            "default: the bundle's categories, else the producing interest."
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write the --diversity trade-off plot to this PNG.")
    ] = None,
) -> None:
    """Recall/HitRate/NDCG@20,50 of a run or a bundle, beside the most-popular baseline."""
    if split not in ("valid", "test"):
        raise CliError("--split must be 'valid' or 'test'")
    lambdas = _lambdas(diversity)
    if (categories or plot) and lambdas is None:
        raise CliError("--categories and --plot go with --diversity")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Checked before the evaluation, whose minutes the missing plot would otherwise waste.
        raise CliError("--plot needs matplotlib (pip install matplotlib, or the dev extra)")
    item_categories = None
    if not path.exists():
        raise CliError(f"{path} does not exist (a run directory, a bundle version or a root)")
    if RunDir(path).exists():
        if dataset_dir is not None:
            raise CliError("--dataset-dir applies to bundles; a run is evaluated on its own data")
        model, dataset, cfg = load_run(path)
        eval_set = make_eval_set(dataset, dataset.users(split), cfg.seq_len)
        model_set, item_ids, popularity = eval_set, dataset.item_ids, dataset.popularity()
    else:
        if dataset_dir is None:
            raise CliError("--dataset-dir is required to evaluate a bundle")
        bundle = load_bundle(path)
        dataset = SequenceDataset.load(dataset_dir)
        model, item_ids, item_categories = bundle.encoder, bundle.item_ids, bundle.categories
        eval_set = make_eval_set(dataset, dataset.users(split), bundle.config.seq_len)
        model_set = bundle_eval_set(bundle, dataset, split)  # the same users in bundle rows
        popularity = bundle.popularity
    if len(eval_set) == 0:  # torch.cat() of no batches was the message
        raise CliError(f"the dataset's {split} split has no users to evaluate")
    report: dict[str, Any] = {
        "split": split,
        "users": len(eval_set),
        "model": evaluate_model(model, model_set, popularity=popularity),
        "most_popular": evaluate_popularity(dataset.popularity(), eval_set),
    }
    if lambdas is not None:
        if categories is not None:
            try:
                item_categories = read_categories(categories, item_ids).rows
            except DataError as exc:
                raise CliError(f"--categories: {exc}") from None
        points = evaluate_diversity(
            model, model_set, lambdas, item_categories, popularity=popularity
        )
        source = "bundle" if item_categories is not None else "producing interest"
        report["diversity"] = {"categories": str(categories or source), "points": points}
        if plot is not None:
            tradeoff_plot(points, plot, f"{dataset.name}: diverse aggregation ({split} users)")
    echo_json(report)


def _lambdas(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--diversity: {text!r} is not a comma-separated list of numbers") from None
    if not values or any(not 0 <= v <= MAX_DIVERSITY for v in values):
        raise CliError(f"--diversity: each lambda must lie in 0..{MAX_DIVERSITY}, got {text!r}")
    return values


@config_options(ExportConfig, "export")
def export(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Training run to export.")],
    bundle_root: Annotated[Path, typer.Option("--bundle-root", help="Bundle root directory.")],
    config: ConfigOpt = None,
    publish: Annotated[
        bool,
        typer.Option(
            help="Point `current` at the new version. Unpublished, it is removed by the next "
            "nightly run's pruning once an hour old."
        ),
    ] = True,
    *,
    export_flags: dict[str, Any],
) -> None:
    """Write the run's best checkpoint as a new bundle version (and publish it)."""
    cfg = settings(ExportConfig, read_config(config), "export", **export_flags)
    if not RunDir(run_dir).exists():
        raise CliError(f"--run-dir: {run_dir} is not a training run (config.json missing)")
    try:
        path = export_run(run_dir, bundle_root, cfg, publish=publish)
    except RunError as exc:
        raise CliError(f"--run-dir: {exc}") from None
    except DataError as exc:
        raise CliError(f"--categories: {exc}") from None
    echo_json({"bundle": str(path), "published": publish})
